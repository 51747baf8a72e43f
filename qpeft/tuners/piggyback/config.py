"""PiggybackConfig (qpeft's own method and file format)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import TargetedConfig, is_number


@dataclasses.dataclass
class PiggybackConfig(TargetedConfig):
    """Learned binary masks over the targeted 4-bit weights (``target_modules`` as in LoRA): scores start at
    ``init_score`` (every weight kept), the mask keeps the weights whose score exceeds ``threshold``.
    ``score_dtype``: "float32" or "bfloat16" (scores take 4 or 2 bytes per weight while training)."""

    peft_type: ClassVar[str] = "QPEFT_PIGGYBACK"

    threshold: float = 5e-3
    init_score: float = 1e-2
    score_dtype: str = "float32"

    def validate(self, source: str | None = None) -> None:
        super().validate(source)
        for key in ("threshold", "init_score"):
            if not is_number(getattr(self, key)):
                self.fail(key, "must be a finite number", source)
        if is_number(self.threshold) and is_number(self.init_score) and self.init_score <= self.threshold:
            self.fail(
                "init_score", f"must exceed threshold ({self.threshold}) so training starts from the base", source
            )
        if self.score_dtype not in ("float32", "bfloat16"):
            self.fail("score_dtype", "must be 'float32' or 'bfloat16'", source)
