"""SparseConfig (qpeft's own method and file format)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import Check, TargetedConfig, checked, is_int, is_number, one_of

BUDGET = Check(
    lambda b: (is_int(b) and b > 0) or (isinstance(b, float) and is_number(b) and 0 < b <= 1),
    "must be a positive number of entries or a fraction in (0, 1]",
)


@dataclasses.dataclass
class SparseConfig(TargetedConfig):
    """Sparse fine-tuning: a trainable sparse difference on each targeted 4-bit weight (``target_modules`` as in
    LoRA). ``budget``: entries per layer (an integer), or a fraction of the layer's weights (a float in (0, 1]).
    ``selection``: "gradient" (the entries of largest accumulated |dL/dW| over warm-up batches, chosen by
    ``QPeftModel.select_sparse_entries``; no entry until then) or "random" (``seed``)."""

    peft_type: ClassVar[str] = "QPEFT_SPARSE"

    budget: int | float = checked(0.01, BUDGET)
    selection: str = checked("gradient", one_of("gradient", "random"))
    seed: int = checked(0, Check(is_int, "must be an integer"))

    def entries(self, out_features: int, in_features: int) -> int:
        n = out_features * in_features
        return min(self.budget, n) if is_int(self.budget) else max(1, round(self.budget * n))
