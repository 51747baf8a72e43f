"""peft's AdaLoraConfig: LoRA's targeting plus the rank allocator's schedule."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import COUNT, NON_NEGATIVE, SIZE, Check, checked, is_number
from ..lora.config import LoraConfig

BETA = Check(lambda v: is_number(v) and 0 < v < 1, "must be a number in (0, 1)")
KEPT_RANKS = Check(
    lambda v: (
        v is None
        or (
            isinstance(v, dict)
            and all(
                isinstance(k, str)
                and k.endswith(".lora_E")
                and isinstance(m, list)
                and all(isinstance(b, bool) for b in m)
                for k, m in v.items()
            )
        )
    ),
    'must map "<module>.lora_E" to a list of booleans (the kept ranks)',
)


@dataclasses.dataclass
class AdaLoraConfig(LoraConfig):
    """Adapters of rank ``init_r`` whose total rank the allocator brings to ``target_r`` per layer: no masking for
    ``tinit`` steps, then a cubic budget every ``deltaT`` steps, the final pattern for the last ``tfinal`` of
    ``total_step``; importance EMAs ``beta1`` / ``beta2``; ``orth_reg_weight`` times the orthogonality penalty of A
    and B added to the loss. ``rank_pattern`` ("<module>.lora_E" -> kept ranks as booleans) is the allocator's
    result, and what a saved adapter is trimmed to. ``r`` is not used (peft's rule)."""

    peft_type: ClassVar[str] = "ADALORA"

    target_r: int = checked(8, SIZE)
    init_r: int = checked(12, SIZE)
    tinit: int = checked(0, COUNT)
    tfinal: int = checked(0, COUNT)
    deltaT: int = checked(1, SIZE)
    beta1: float = checked(0.85, BETA)
    beta2: float = checked(0.85, BETA)
    orth_reg_weight: float = checked(0.5, NON_NEGATIVE)
    total_step: int | None = checked(
        None, Check(SIZE.accepts, "must be a positive number of training steps (AdaLoRA's schedule needs it)")
    )
    rank_pattern: dict | None = checked(None, KEPT_RANKS)

    def check_together(self, source: str | None = None) -> None:
        super().check_together(source)
        if self.use_dora:
            self.fail("use_dora", "is not supported with AdaLoRA (as in peft)", source)
        if self.lora_bias:
            self.fail("lora_bias", "is not supported with AdaLoRA", source)
        if self.tinit >= self.total_step - self.tfinal:
            self.fail(
                "tinit",
                f"leaves no budgeting phase (tinit < total_step - tfinal = {self.total_step - self.tfinal} is needed)",
                source,
            )

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
