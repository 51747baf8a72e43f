"""All-or-nothing changes to a model: the module tree, parameters and buffers (by reference), forward hooks,
trainable flags and adapter selections, put back when adding or loading an adapter fails part-way. Values are not
copied: loads stage every tensor (checked and converted) before the first write (adapter_io.assign_tensors)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ..nn.adapter_holder import NamedAdapters
from ..nn.modules_to_save import ModulesToSave


class ModelSnapshot:
    def __init__(self, root: nn.Module):
        modules = list(root.modules())
        self.slots = [
            (m, dict(m._modules), dict(m._parameters), dict(m._buffers), dict(m._forward_hooks)) for m in modules
        ]
        self.flags = [(p, p.requires_grad) for p in root.parameters()]
        self.active = [(m, list(m.active_adapters)) for m in modules if isinstance(m, NamedAdapters)]
        self.wrappers = [(m, m.active) for m in modules if isinstance(m, ModulesToSave)]

    def restore(self) -> None:
        for module, children, parameters, buffers, hooks in self.slots:
            for slot, saved in (
                (module._modules, children),
                (module._parameters, parameters),
                (module._buffers, buffers),
                (module._forward_hooks, hooks),
            ):
                slot.clear()
                slot.update(saved)
        for layer, active in self.active:
            layer.active_adapters = active
        for wrapper, active in self.wrappers:
            wrapper.active = active
        for p, flag in self.flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def all_or_nothing(model: nn.Module, peft_model=None) -> Iterator[None]:
    """Runs the block; if it raises, ``model`` (and ``peft_model``'s adapter registry) is restored as it was."""
    snapshot = ModelSnapshot(model if peft_model is None else peft_model)
    registry = None if peft_model is None else peft_model.registry_state()
    try:
        yield
    except BaseException:
        snapshot.restore()
        if registry is not None:
            peft_model.restore_registry_state(registry)
        raise
