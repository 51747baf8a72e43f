"""SparseConfig (qpeft's own method and file format)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import AdapterConfig, is_int, is_names, is_number


@dataclasses.dataclass
class SparseConfig(AdapterConfig):
    """Sparse fine-tuning: a trainable sparse difference on each targeted 4-bit weight (``target_modules`` as in
    LoRA). ``budget``: entries per layer (an integer), or a fraction of the layer's weights (a float in (0, 1]).
    ``selection``: "gradient" (the entries of largest accumulated |dL/dW| over warm-up batches, chosen by
    ``QPeftModel.select_sparse_entries``; no entry until then) or "random" (``seed``)."""

    peft_type: ClassVar[str] = "QPEFT_SPARSE"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    budget: int | float = 0.01
    selection: str = "gradient"
    seed: int = 0
    modules_to_save: None = None
    layers_to_transform: None = None
    layers_pattern: None = None

    def validate(self, source: str | None = None) -> None:
        super().validate(source)
        for key in ("target_modules", "exclude_modules"):
            if getattr(self, key) is not None and not is_names(getattr(self, key)):
                self.fail(key, "must be a name, a regex or a list of names", source)
        b = self.budget
        if not ((is_int(b) and b > 0) or (isinstance(b, float) and is_number(b) and 0 < b <= 1)):
            self.fail("budget", "must be a positive number of entries or a fraction in (0, 1]", source)
        if self.selection not in ("gradient", "random"):
            self.fail("selection", "must be 'gradient' or 'random'", source)
        if not is_int(self.seed):
            self.fail("seed", "must be an integer", source)
        for key in ("modules_to_save", "layers_to_transform", "layers_pattern"):
            if getattr(self, key) is not None:
                self.fail(key, "is not a sparse fine-tuning option", source)

    def entries(self, out_features: int, in_features: int) -> int:
        n = out_features * in_features
        return min(self.budget, n) if is_int(self.budget) else max(1, round(self.budget * n))
