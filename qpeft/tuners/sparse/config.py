"""SparseConfig (qpeft's own method and file format)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import TargetedConfig, is_int, is_number


@dataclasses.dataclass
class SparseConfig(TargetedConfig):
    """Sparse fine-tuning: a trainable sparse difference on each targeted 4-bit weight (``target_modules`` as in
    LoRA). ``budget``: entries per layer (an integer), or a fraction of the layer's weights (a float in (0, 1]).
    ``selection``: "gradient" (the entries of largest accumulated |dL/dW| over warm-up batches, chosen by
    ``QPeftModel.select_sparse_entries``; no entry until then) or "random" (``seed``)."""

    peft_type: ClassVar[str] = "QPEFT_SPARSE"

    budget: int | float = 0.01
    selection: str = "gradient"
    seed: int = 0

    def validate(self, source: str | None = None) -> None:
        super().validate(source)
        b = self.budget
        if not ((is_int(b) and b > 0) or (isinstance(b, float) and is_number(b) and 0 < b <= 1)):
            self.fail("budget", "must be a positive number of entries or a fraction in (0, 1]", source)
        if self.selection not in ("gradient", "random"):
            self.fail("selection", "must be 'gradient' or 'random'", source)
        if not is_int(self.seed):
            self.fail("seed", "must be an integer", source)

    def entries(self, out_features: int, in_features: int) -> int:
        n = out_features * in_features
        return min(self.budget, n) if is_int(self.budget) else max(1, round(self.budget * n))
