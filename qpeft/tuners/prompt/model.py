"""Prompt learning at run time on a transformers model: virtual tokens before the input (prompt tuning, P-tuning,
multitask; on an encoder-decoder, before the encoder's input, as peft puts them) or keys and values before every
layer's own (prefix tuning, decoder-only models, through a Cache), in training forwards and in ``generate``.

Prefix tuning in a training forward uses a read-only cache: each layer attends to cat(prefix, own) and nothing is
stored, so a checkpointed layer recomputes the same thing in the backward (peft refuses gradient checkpointing
here); decoder layers keep that cache under checkpointing. ``generate`` starts from a cache holding the prefix.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from .. import targets
from .config import MultitaskPromptTuningConfig, PrefixTuningConfig, PromptLearningConfig
from .encoders import make_encoder


def setup(model: nn.Module, config: PromptLearningConfig, loaded: bool) -> nn.Module:
    """Fills the config's sizes from ``model``, makes its linear layers 4-bit (``config.quantize``), freezes it and
    returns the new encoder (on the model's device, fp32)."""
    model_config = getattr(model, "config", None)
    if model_config is None:
        raise ValueError("qpeft: prompt learning needs a transformers model (one with a .config)")
    config.fill_from_model(model_config)
    if config.quantize:
        targets.quantize_linears(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return make_encoder(config, model.get_input_embeddings(), loaded).to(device)


@functools.cache
def _cache_kwarg(model_class: type) -> str:
    """The name under which ``model_class.forward`` takes a Cache (transformers 5.x renamed past_key_values to
    cache)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def prefix_key_values(
    encoder: nn.Module, config: PrefixTuningConfig, batch: int, dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (keys, values) [batch, heads, T, head_dim] of the prefix (expanded over the batch, not copied)."""
    t, heads = config.num_virtual_tokens, config.num_attention_heads
    kv = []
    for i in range(config.num_layers):
        layer = encoder.layer_prompt(i).to(dtype).view(t, 2, heads, config.token_dim // heads)
        layer = layer.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)
        kv.append((layer[0], layer[1]))
    return kv


@functools.cache
def _read_only_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PrefixLayer(DynamicLayer):
        """A layer's prefix: ``update`` returns cat(prefix, new) and stores nothing."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor):
            super().__init__()
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values

        def update(self, key_states, value_states, *args, **kwargs):
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    return PrefixLayer


def prefix_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], read_only: bool):
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=kv)
    if read_only:
        layer_class = _read_only_layer_class()
        cache.layers = [layer_class(k, v) for k, v in kv]
    return cache


@contextlib.contextmanager
def _layers_keep_cache(model: nn.Module) -> Iterator[None]:
    """Checkpointed transformers layers keep the (read-only) cache within the block: each layer is told it may
    (``_can_checkpoint_with_cache``) and a backbone that would drop the cache for its checkpointed layers (GPT-2)
    does not see its checkpointing flag; the layers still checkpoint."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    changed = []
    for m in model.modules():
        if not getattr(m, "gradient_checkpointing", False):
            continue
        name, value = (
            ("_can_checkpoint_with_cache", True)
            if isinstance(m, GradientCheckpointingLayer)
            else ("gradient_checkpointing", False)
        )
        changed.append((m, name, m.__dict__.get(name, _UNSET)))
        setattr(m, name, value)
    try:
        yield
    finally:
        for m, name, old in reversed(changed):
            if old is _UNSET:
                delattr(m, name)
            else:
                setattr(m, name, old)


_UNSET = object()


def _prompts(encoder: nn.Module, config: PromptLearningConfig, batch: int, task_ids, dtype) -> torch.Tensor:
    """The virtual tokens' embeddings [batch, T, token_dim] in ``dtype``."""
    if isinstance(config, MultitaskPromptTuningConfig):
        if task_ids is None:
            raise ValueError("qpeft: multitask prompt tuning needs task_ids (one task index per sequence)")
        task_ids = torch.as_tensor(task_ids, device=encoder.embedding.weight.device).reshape(-1)
        if task_ids.shape[0] != batch or task_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"qpeft: task_ids must be {batch} integers, got {tuple(task_ids.shape)} {task_ids.dtype}")
        if ((task_ids < 0) | (task_ids >= config.num_tasks)).any():
            raise ValueError(f"qpeft: task_ids must be in [0, {config.num_tasks})")
        return encoder.task_prompt(task_ids.long()).to(dtype)
    return encoder.prompt().to(dtype).unsqueeze(0).expand(batch, -1, -1)


def _batch_size(input_ids, inputs_embeds) -> int:
    if input_ids is not None:
        return input_ids.shape[0]
    if inputs_embeds is not None:
        return inputs_embeds.shape[0]
    raise ValueError("qpeft: pass input_ids or inputs_embeds")


def _prefixed_mask(attention_mask: torch.Tensor | None, batch: int, n: int, length: int, device) -> torch.Tensor:
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
    if attention_mask.dim() != 2:
        raise ValueError("qpeft: prompt learning takes a 2-d attention_mask [batch, length]")
    ones = torch.ones(batch, n, dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([ones, attention_mask], dim=1)


def _drop_unsupported(config: PromptLearningConfig, kwargs: dict) -> None:
    """position_ids move past the prefix (prefix tuning) or are dropped (virtual tokens); token_type_ids dropped."""
    if kwargs.get("position_ids") is not None:
        if isinstance(config, PrefixTuningConfig):
            kwargs["position_ids"] = kwargs["position_ids"] + config.num_virtual_tokens
        else:
            warnings.warn("qpeft: position_ids are ignored with virtual tokens (as in peft)")
            kwargs["position_ids"] = None
    if kwargs.get("token_type_ids") is not None:
        warnings.warn("qpeft: token_type_ids are ignored with prompt learning (as in peft)")
        kwargs["token_type_ids"] = None


def forward(
    model: nn.Module,
    encoder: nn.Module,
    config: PromptLearningConfig,
    input_ids=None,
    attention_mask=None,
    inputs_embeds=None,
    labels=None,
    task_ids=None,
    **kwargs,
):
    """``model``'s forward with the adapter's virtual tokens or prefix (labels of virtual tokens are -100)."""
    batch = _batch_size(input_ids, inputs_embeds)
    length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    device = (input_ids if input_ids is not None else inputs_embeds).device
    n = config.num_virtual_tokens
    _drop_unsupported(config, kwargs)
    if isinstance(config, PrefixTuningConfig):
        kv = prefix_key_values(encoder, config, batch, _model_dtype(model))
        kwargs[_cache_kwarg(type(model))] = prefix_cache(kv, read_only=True)
        kwargs["attention_mask"] = _prefixed_mask(attention_mask, batch, n, length, device)
        with _layers_keep_cache(model):
            return model(input_ids=input_ids, inputs_embeds=inputs_embeds, labels=labels, **kwargs)
    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    prompts = _prompts(encoder, config, batch, task_ids, inputs_embeds.dtype)
    inputs_embeds = torch.cat([prompts[:, :n], inputs_embeds], dim=1)
    if attention_mask is not None:
        attention_mask = _prefixed_mask(attention_mask, batch, n, length, device)
    if config.num_transformer_submodules == 2:  # an encoder-decoder: the decoder's inputs as peft builds them
        return _seq2seq_forward(model, config, prompts, inputs_embeds, attention_mask, labels, kwargs)
    if labels is not None:
        labels = _virtual_labels(labels, n)
    return model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)


def _virtual_labels(labels: torch.Tensor, n: int) -> torch.Tensor:
    """``labels`` after n virtual positions that are never predicted (-100)."""
    return torch.cat([torch.full((labels.shape[0], n), -100, dtype=labels.dtype, device=labels.device), labels], 1)


def _shift_right(labels: torch.Tensor, model_config) -> torch.Tensor:
    """The decoder's input ids for ``labels`` (transformers' rule): the start token, then the labels but the last,
    -100 read as padding."""
    ids = labels.new_full(labels.shape, model_config.decoder_start_token_id)
    ids[:, 1:] = labels[:, :-1]
    return ids.masked_fill(ids == -100, model_config.pad_token_id)


def _seq2seq_forward(model, config, prompts, inputs_embeds, attention_mask, labels, kwargs):
    """peft's encoder-decoder rule: the encoder's input starts with the first n virtual tokens; multitask prompt
    tuning also starts the decoder's input with the other n (its labels there -100), the others leave the decoder
    as it is."""
    n = config.num_virtual_tokens
    if isinstance(config, MultitaskPromptTuningConfig):
        decoder_embeds = kwargs.pop("decoder_inputs_embeds", None)
        decoder_ids = kwargs.pop("decoder_input_ids", None)
        if decoder_embeds is None:
            if decoder_ids is None:
                if labels is None:
                    raise ValueError("qpeft: an encoder-decoder forward needs labels or decoder inputs")
                decoder_ids = _shift_right(labels, model.config)
            decoder_embeds = model.get_input_embeddings()(decoder_ids)
        kwargs["decoder_inputs_embeds"] = torch.cat([prompts[:, n:].to(decoder_embeds.dtype), decoder_embeds], 1)
        if labels is not None:
            labels = _virtual_labels(labels, n)
    return model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)


@torch.no_grad()
def generate(
    model: nn.Module,
    encoder: nn.Module,
    config: PromptLearningConfig,
    input_ids=None,
    attention_mask=None,
    task_ids=None,
    **kwargs,
):
    """``model.generate`` with the adapter: the prefix (a cache holding it) or the virtual tokens injected once,
    the attention mask extended; returns input_ids followed by the new tokens, as peft does."""
    if input_ids is None:
        raise ValueError("qpeft: generate with prompt learning needs input_ids")
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError("qpeft: generate with prompt learning takes input_ids, not inputs_embeds")
    batch, length = input_ids.shape
    n = config.num_virtual_tokens
    mask = _prefixed_mask(attention_mask, batch, n, length, input_ids.device)
    _drop_unsupported(config, kwargs)
    if isinstance(config, PrefixTuningConfig):
        kv = prefix_key_values(encoder, config, batch, _model_dtype(model))
        cache = prefix_cache([(k.contiguous(), v.contiguous()) for k, v in kv], read_only=False)
        return model.generate(input_ids=input_ids, attention_mask=mask, past_key_values=cache, **kwargs)
    embeds = model.get_input_embeddings()(input_ids)
    prompts = _prompts(encoder, config, batch, task_ids, embeds.dtype)
    new = model.generate(inputs_embeds=torch.cat([prompts[:, :n], embeds], dim=1), attention_mask=mask, **kwargs)
    if config.num_transformer_submodules == 2:  # an encoder-decoder generates the decoder's tokens alone
        return new
    return torch.cat([input_ids, new.to(input_ids.device)], dim=1)
