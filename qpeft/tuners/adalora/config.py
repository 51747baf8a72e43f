"""peft's AdaLoraConfig: LoRA's targeting plus the rank allocator's schedule."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import is_int, is_number
from ..lora.config import LoraConfig


@dataclasses.dataclass
class AdaLoraConfig(LoraConfig):
    """Adapters of rank ``init_r`` whose total rank the allocator brings to ``target_r`` per layer: no masking for
    ``tinit`` steps, then a cubic budget every ``deltaT`` steps, the final pattern for the last ``tfinal`` of
    ``total_step``; importance EMAs ``beta1`` / ``beta2``; ``orth_reg_weight`` times the orthogonality penalty of A
    and B added to the loss. ``rank_pattern`` ("<module>.lora_E" -> kept ranks as booleans) is the allocator's
    result, and what a saved adapter is trimmed to. ``r`` is not used (peft's rule)."""

    peft_type: ClassVar[str] = "ADALORA"

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.lora_bias:
            self.fail("lora_bias", "is not supported with AdaLoRA")
        if self.total_step is None or self.total_step <= 0:
            self.fail("total_step", "must be a positive number of training steps (AdaLoRA's schedule needs it)")
        if self.tinit >= self.total_step - self.tfinal:
            self.fail(
                "tinit",
                f"leaves no budgeting phase (tinit < total_step - tfinal = {self.total_step - self.tfinal} is needed)",
            )

    def validate(self, source: str | None = None) -> None:
        super().validate(source)
        if self.use_dora:
            self.fail("use_dora", "is not supported with AdaLoRA (as in peft)", source)
        for key in ("target_r", "init_r"):
            if not is_int(getattr(self, key)) or getattr(self, key) <= 0:
                self.fail(key, "must be a positive integer", source)
        for key in ("tinit", "tfinal"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 0:
                self.fail(key, "must be a non-negative integer", source)
        if not is_int(self.deltaT) or self.deltaT <= 0:
            self.fail("deltaT", "must be a positive integer", source)
        for key in ("beta1", "beta2"):
            if not is_number(getattr(self, key)) or not 0 < getattr(self, key) < 1:
                self.fail(key, "must be a number in (0, 1)", source)
        if not is_number(self.orth_reg_weight) or self.orth_reg_weight < 0:
            self.fail("orth_reg_weight", "must be a number >= 0", source)
        if self.total_step is not None and not is_int(self.total_step):
            self.fail("total_step", "must be an integer", source)

    def check_rank_pattern(self, source: str | None) -> None:
        if self.rank_pattern is None:
            return
        if not isinstance(self.rank_pattern, dict) or not all(
            isinstance(k, str) and k.endswith(".lora_E") and isinstance(v, list) and all(isinstance(b, bool) for b in v)
            for k, v in self.rank_pattern.items()
        ):
            self.fail("rank_pattern", 'must map "<module>.lora_E" to a list of booleans (the kept ranks)', source)

    @classmethod
    def peft_fields(cls, fields: dict, source: str | None) -> dict:
        fields.setdefault("rank_pattern", None)
        pattern = fields.get("rank_pattern")
        if isinstance(pattern, dict):  # peft may keep the adapter name in the keys: "<module>.lora_E.<adapter>"
            fields["rank_pattern"] = {
                k.split(".lora_E")[0] + ".lora_E" if ".lora_E" in k else k: v for k, v in pattern.items()
            }
        fields.setdefault("alpha_pattern", {})
        if fields.get("alpha_pattern") is None:
            fields["alpha_pattern"] = {}
        return fields
