"""peft's modules_to_save wrapper: a module trained in full, one copy per adapter, beside the frozen original (its
lifecycle in a model: tuners/modules_to_save.py). Its ``original_module`` is what a 4-bit checkpoint saves."""

from __future__ import annotations

import copy

from torch import nn


class ModulesToSave(nn.Module):
    """A module of ``modules_to_save``, as peft's ModulesToSaveWrapper: the original module (frozen) and one
    trainable copy per adapter that lists it. The forward runs the active adapter's copy, or the original module
    when adapters are disabled or the active adapter has no copy (so ``disable_adapter()`` gives the base model
    back, as in peft). State-dict names are peft's: ``original_module.*`` and ``modules_to_save.<adapter>.*``;
    other attributes (``weight``, ...) are read from the module in use."""

    BASE_CHILD = "original_module"

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def in_use(self) -> nn.Module:
        if self.disabled or self.active is None:
            return self.original_module
        return self.modules_to_save[self.active]

    def forward(self, *args, **kwargs):
        return self.in_use()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save") or "_modules" not in self.__dict__:
                raise
            return getattr(self.in_use(), name)
