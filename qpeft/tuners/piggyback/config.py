"""PiggybackConfig (qpeft's own method and file format)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..config import NUMBER, TargetedConfig, checked, one_of


@dataclasses.dataclass
class PiggybackConfig(TargetedConfig):
    """Learned binary masks over the targeted 4-bit weights (``target_modules`` as in LoRA): scores start at
    ``init_score`` (every weight kept), the mask keeps the weights whose score exceeds ``threshold``.
    ``score_dtype``: "float32" or "bfloat16" (scores take 4 or 2 bytes per weight while training)."""

    peft_type: ClassVar[str] = "QPEFT_PIGGYBACK"

    threshold: float = checked(5e-3, NUMBER)
    init_score: float = checked(1e-2, NUMBER)
    score_dtype: str = checked("float32", one_of("float32", "bfloat16"))

    def check_together(self, source: str | None = None) -> None:
        super().check_together(source)
        dtype = getattr(torch, self.score_dtype)  # compared as the scores hold them
        if not torch.tensor(self.init_score, dtype=dtype) > torch.tensor(self.threshold, dtype=dtype):
            self.fail(
                "init_score",
                f"must exceed threshold ({self.threshold}) in {self.score_dtype}, so training starts from the base",
                source,
            )
