"""peft's IA3Config."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import AdapterConfig, is_names


@dataclasses.dataclass
class IA3Config(AdapterConfig):
    """Learned scaling vectors on the targeted linear layers: the output of attention targets, the input of
    ``feedforward_modules`` (which must be targets too). Targeting as in LoRA (names, one regex, "all-linear")."""

    peft_type: ClassVar[str] = "IA3"
    strict_keys: ClassVar[bool] = False

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True
    layers_to_transform: None = None  # (targeting reads these; IA3 has no layer selection)
    layers_pattern: None = None

    def __post_init__(self):
        for key in ("target_modules", "exclude_modules", "feedforward_modules"):
            if isinstance(getattr(self, key), (set, tuple)):
                setattr(self, key, sorted(getattr(self, key)))
        self.validate()

    def validate(self, source: str | None = None) -> None:
        super().validate(source)
        for key in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, key)
            if value is not None and not is_names(value):
                self.fail(key, "must be a name, a regex or a list of names", source)
        for key in ("fan_in_fan_out", "init_ia3_weights"):
            if not isinstance(getattr(self, key), bool):
                self.fail(key, "must be true or false", source)
        if self.modules_to_save is not None and (
            isinstance(self.modules_to_save, str) or not is_names(list(self.modules_to_save), False)
        ):
            self.fail("modules_to_save", "must be a list of names", source)
        if self.layers_to_transform is not None or self.layers_pattern is not None:
            self.fail("layers_to_transform", "is not an IA3 option", source)
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
