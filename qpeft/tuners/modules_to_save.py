"""peft's modules_to_save in a model, for every method whose config has the field: each listed module wrapped
once (``ModulesToSave``), a copy per adapter added, activated, deleted and unwrapped; the copies' file keys."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..nn.modules_to_save import ModulesToSave
from . import targets
from .lora.model import PREFIX

__all__ = ["ModulesToSave", "activate", "add", "check_active", "delete", "file_parameters", "unwrap", "wrappers"]


def wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    return targets.modules_of(model, ModulesToSave)


def add(model: nn.Module, config, adapter_name: str) -> None:
    """Each module the config's ``modules_to_save`` names gets its wrapper (once) and a copy for the adapter."""
    for name, module in targets.modules_to_save_of(model, getattr(config, "modules_to_save", None)):
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            targets.set_submodule(model, name, module)
        module.add(adapter_name)


def check_active(model: nn.Module, names: Sequence[str]) -> None:
    """At most one adapter of ``names`` has a copy of each wrapped module (else ValueError, nothing changed)."""
    for wname, wrapper in wrappers(model):
        owners = [n for n in names if n in wrapper.modules_to_save]
        if len(owners) > 1:
            raise ValueError(
                f"qpeft: adapters {owners} each have their own copy of {wname!r} "
                "(modules_to_save); only one of them can be active at a time, as in peft"
            )


def activate(model: nn.Module, names: Sequence[str]) -> None:
    """Each wrapper runs the copy of the adapter of ``names`` that has one (``check_active`` first)."""
    for _, wrapper in wrappers(model):
        owners = [n for n in names if n in wrapper.modules_to_save]
        wrapper.active = owners[0] if owners else None


def delete(model: nn.Module, adapter_name: str) -> None:
    """The adapter's copies removed; a wrapper left with no copy is the plain module again."""
    for name, wrapper in list(wrappers(model)):
        if adapter_name in wrapper.modules_to_save:
            del wrapper.modules_to_save[adapter_name]
            if wrapper.active == adapter_name:
                wrapper.active = None
            if not len(wrapper.modules_to_save):
                targets.set_submodule(model, name, wrapper.original_module)


def unwrap(model: nn.Module) -> None:
    """Each wrapper replaced by the module in use (the active adapter's copy), as peft's merge_and_unload / unload."""
    for name, wrapper in list(wrappers(model)):
        targets.set_submodule(model, name, wrapper.in_use())


def file_parameters(model: nn.Module, config, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's copies' parameters under peft's keys (the module's own parameter names)."""
    params = {}
    for mname, wrapper in targets.modules_to_save_of(model, getattr(config, "modules_to_save", None)):
        if isinstance(wrapper, ModulesToSave) and adapter_name in wrapper.modules_to_save:
            for pname, p in wrapper.modules_to_save[adapter_name].named_parameters():
                params[f"{PREFIX}{mname}.{pname}"] = p
    return params
