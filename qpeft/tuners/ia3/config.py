"""peft's IA3Config."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import BOOL, NAME_LIST, NAMES, UNSUPPORTED, AdapterConfig, checked


@dataclasses.dataclass
class IA3Config(AdapterConfig):
    """Learned scaling vectors on the targeted linear layers: the output of attention targets, the input of
    ``feedforward_modules`` (which must be targets too). Targeting as in LoRA (names, one regex, "all-linear")."""

    peft_type: ClassVar[str] = "IA3"
    strict_keys: ClassVar[bool] = False

    target_modules: list[str] | str | None = checked(None, NAMES)
    exclude_modules: list[str] | str | None = checked(None, NAMES)
    feedforward_modules: list[str] | str | None = checked(None, NAMES)
    fan_in_fan_out: bool = checked(False, BOOL)
    modules_to_save: list[str] | None = checked(None, NAME_LIST)
    init_ia3_weights: bool = checked(True, BOOL)
    layers_to_transform: None = checked(None, UNSUPPORTED)  # (targeting reads these; IA3 has no layer selection)
    layers_pattern: None = checked(None, UNSUPPORTED)

    def check_together(self, source: str | None = None) -> None:
        super().check_together(source)
        ff, t = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(t, list) and not set(ff) <= set(t):
            self.fail("feedforward_modules", f"must be a subset of target_modules {t}", source)

    def to_peft_dict(self) -> dict:
        d = super().to_peft_dict()
        for key in ("layers_to_transform", "layers_pattern"):
            d.pop(key)
        d["modules_to_save"] = list(self.modules_to_save) if self.modules_to_save else None
        return d

    @classmethod
    def peft_fields(cls, fields: dict, source: str | None) -> dict:
        fields.pop("layers_to_transform", None)
        fields.pop("layers_pattern", None)
        return fields
