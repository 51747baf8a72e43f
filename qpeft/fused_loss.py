"""The causal-LM loss without the [tokens, vocab] logits, for QPeftModel's training forward.

When a transformers causal LM is called in training mode with ``labels``, its output head is swapped for a probe
for the duration of the call: the backbone runs as usual (checkpointing, adapters), the probe keeps the hidden
states and returns a zero-stride placeholder instead of logits, and the loss is computed from the hidden states
through the real head in chunks (autograd.chunked_loss) with the model's own label shift (labels moved one left,
the last position ignored, or ``shift_labels`` as given) and ``num_items_in_batch``. The output then has the loss
and no logits. A model that transforms its logits after the head (a soft cap, a scale) returns something other
than the placeholder: it is run again unfused and marked to stay unfused. Evaluation mode, calls without labels,
``logits_to_keep``, ``return_dict=False`` and encoder-decoders always take the model's own path.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .autograd.chunked_loss import linear_cross_entropy
from .tuners.config import text_config

IGNORE_INDEX = -100
_UNFUSABLE = "_qpeft_unfusable_logits"  # set on a model whose forward transforms the head's output
_HEAD_NAME = "_qpeft_output_head_name"  # the output head's module name, kept on the model


class _HeadProbe(nn.Module):
    """Stands in for the output head: keeps its input, returns a zero-stride [..., vocab] placeholder."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden = self.placeholder = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.hidden = x
        self.placeholder = x.new_zeros(()).expand(*x.shape[:-1], self.vocab_size)
        return self.placeholder


def head_of(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of a decoder-only causal LM's output head, or None when the model is not one. The head's name
    is found once and kept on the model (found again if the head was replaced)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or getattr(model, _UNFUSABLE, False):
        return None
    if getattr(model, "loss_type", None) != "ForCausalLM" or not hasattr(model, "get_output_embeddings"):
        return None
    head = model.get_output_embeddings()
    if head is None:
        return None
    name = model.__dict__.get(_HEAD_NAME)
    if name is None or model.get_submodule(name) is not head:
        name = next((n for n, m in model.named_modules() if m is head), None)
        model.__dict__[_HEAD_NAME] = name
    return None if name is None else (name, head)


def fusable(model: nn.Module, kwargs: dict) -> tuple[str, nn.Module] | None:
    """The head (``head_of``) when this call's loss can go through it in chunks, else None."""
    if not model.training or kwargs.get("labels") is None or kwargs.get("logits_to_keep"):
        return None
    return head_of(model) if kwargs.get("return_dict", True) is not False else None


def causal_lm_forward(model: nn.Module, head: tuple[str, nn.Module], args: tuple, kwargs: dict):
    """``model(*args, **kwargs)`` with the loss computed through ``head`` (name, module; ``fusable``'s) in chunks."""
    from .tuners.targets import set_submodule

    name, head = head
    given, kwargs = kwargs, dict(kwargs)
    labels = kwargs.pop("labels")
    shift_labels = kwargs.pop("shift_labels", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    vocab = _vocab_size(model, head)
    probe = _HeadProbe(vocab)
    set_submodule(model, name, probe)
    try:
        outputs = model(*args, **kwargs)
    finally:
        set_submodule(model, name, head)
    logits = getattr(outputs, "logits", None)
    if logits is None or logits is not probe.placeholder:
        setattr(model, _UNFUSABLE, True)
        warnings.warn(
            f"qpeft: {type(model).__name__} transforms its logits after the head; its loss is computed unfused",
            stacklevel=3,
        )
        return model(*args, **given)
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    outputs.loss = linear_cross_entropy(
        probe.hidden, head, shift_labels, vocab, ignore_index=IGNORE_INDEX, num_items_in_batch=num_items
    )
    outputs.logits = None
    return outputs


def _vocab_size(model: nn.Module, head: nn.Module) -> int:
    size = getattr(head, "out_features", None)
    return int(size if size is not None else text_config(model.config).vocab_size)
