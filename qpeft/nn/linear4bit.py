"""``Linear4bit``: a frozen linear layer whose weight is stored in 4 bits (NF4/FP4, optional double quant).

y = x W^T + b through the linear_4bit op (W never kept dense). Its state dict uses bitsandbytes' Linear4bit keys,
so it loads bitsandbytes / HF 4-bit checkpoints and bitsandbytes loads what it saves; ``load_state_dict`` works.
No 4-bit tensor is held in a floating dtype (codes uint8, fp32 scales as int32 bit views), so ``module.half()``
cannot corrupt them.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .. import functional as F
from ..autograd import frozen_4bit_linear, weight_args
from ..files import release_file_pages
from ..formats import WEIGHT_FIELDS
from ..quantized import Quantized4bitWeight

# Buffer name -> Quantized4bitWeight field, for the tensors besides the packed weight itself.
STATE_BUFFERS = {f.buffer: f.name for f in WEIGHT_FIELDS if f.buffer is not None}


def _to_buffer(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.view(torch.int32) if t is not None and t.dtype == torch.float32 else t


def _from_buffer(t: torch.Tensor | None, field: str) -> torch.Tensor | None:
    if t is None or field == "absmax" and t.dtype == torch.uint8:
        return t
    return t.view(torch.float32)


def autocast_as_linear(forward):
    """A 4-bit layer's ``forward(self, x, ...)`` under torch.autocast behaves as nn.Linear's does: x goes to the
    autocast dtype and the result stays in it. The body runs with autocast off (qpeft's ops choose their own
    dtypes: fp32 adapters, fp32 accumulation), so autocast never re-casts half of one op's inputs."""

    @functools.wraps(forward)
    def wrapper(self, x, *args, **kwargs):
        if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type) or not x.is_floating_point():
            return forward(self, x, *args, **kwargs)  # (a bad input meets the layer's own check)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return forward(self, x.to(dtype), *args, **kwargs)

    return wrapper


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 family): a linear layer y = x W + b whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def dense_layer(weight: torch.Tensor, bias: torch.Tensor | None, fan_in_fan_out: bool = False) -> nn.Module:
    """A dense layer computing x weight^T + bias for weight [out, in]: nn.Linear, or transformers' Conv1D holding
    weight^T when ``fan_in_fan_out`` (so a model keeps its layer types and checkpoint shapes)."""
    out_features, in_features = weight.shape
    with torch.no_grad():
        if fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D

            layer = Conv1D(out_features, in_features).to(device=weight.device, dtype=weight.dtype)
            layer.weight.copy_(weight.T)
            if bias is None:  # Conv1D always has a bias
                layer.bias.zero_()
            else:
                layer.bias.copy_(bias)
            return layer
        layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer


class Linear4bit(nn.Module):
    """Frozen 4-bit linear layer. ``weight`` is the packed uint8 (or quant_storage) parameter, as in bitsandbytes.

    Args:
        in_features, out_features, bias: as nn.Linear (the bias stays in ``bias_dtype`` and is trainable).
        compute_dtype: dtype of the matmul; None uses the input's dtype.
        quant_type, blocksize, double_quant, quant_storage: the 4-bit format (bitsandbytes' meaning).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        placeholder = torch.zeros(out_features, in_features, dtype=torch.bfloat16, device=device)
        self.set_quantized_weight(
            Quantized4bitWeight.from_float(placeholder, quant_type, blocksize, double_quant, quant_storage)
        )
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device)) if bias else None
        self.fan_in_fan_out = False  # quantized from a Conv1D (weight stored [in, out]): to_linear gives one back

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        quant_storage: torch.dtype = torch.uint8,
    ) -> "Linear4bit":
        """Quantize an nn.Linear (on its device), or a transformers Conv1D: its weight [in, out] is quantized
        transposed, as transformers' bitsandbytes integration does. The bias is copied unquantized, in its own
        dtype."""
        conv1d = is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or conv1d):
            raise TypeError(
                f"qpeft: from_linear expects an nn.Linear or a transformers Conv1D, got {type(linear).__name__}"
            )
        weight = linear.weight.detach()
        weight = weight.T.contiguous() if conv1d else weight
        q = Quantized4bitWeight.from_float(weight, quant_type, blocksize, double_quant, quant_storage)
        release_file_pages(linear.weight)  # a mapped checkpoint's pages this read: read again from the file if needed
        bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        return cls.from_quantized(q, bias, compute_dtype, fan_in_fan_out=conv1d)

    @classmethod
    def from_quantized(
        cls,
        q: Quantized4bitWeight,
        bias: nn.Parameter | None = None,
        compute_dtype: torch.dtype | None = None,
        fan_in_fan_out: bool = False,
    ) -> "Linear4bit":
        """A layer holding ``q`` (no copy) and ``bias`` (this Parameter itself); ``fan_in_fan_out``: q is the
        transpose of a Conv1D's weight (to_linear gives a Conv1D back)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.out_features, module.in_features = q.shape
        module.compute_dtype = compute_dtype
        module.set_quantized_weight(q)
        module.bias = bias
        module.fan_in_fan_out = fan_in_fan_out
        return module

    # ---- the quantized weight -----------------------------------------------------------------------------
    def set_quantized_weight(self, q: Quantized4bitWeight) -> None:
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"qpeft: quantized weight has shape {list(q.shape)}, but this layer is "
                f"[{self.out_features}, {self.in_features}]"
            )
        self._drop_weight_caches()
        self.weight = nn.Parameter(q.packed.reshape(-1, 1).view(torch.uint8), requires_grad=False)
        self.quant_storage = q.quant_storage
        for buffer, field in STATE_BUFFERS.items():
            self.register_buffer(buffer, _to_buffer(getattr(q, field)), persistent=False)
        self.quant_type, self.blocksize, self.weight_dtype = q.quant_type, q.blocksize, q.dtype

    @property
    def quantized_weight(self) -> Quantized4bitWeight:
        """A view of this layer's weight as a Quantized4bitWeight (no copy)."""
        tensors = {field: _from_buffer(getattr(self, buffer), field) for buffer, field in STATE_BUFFERS.items()}
        packed = self.weight.data.reshape(-1).view(self.quant_storage).unsqueeze(1)
        return Quantized4bitWeight(
            packed,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            **tensors,
        )

    def op_weight_args(self) -> tuple:
        """weight_args of this layer's weight (views of its tensors, as qpeft's ops take them), cached until the
        tensors are replaced or moved: building them costs more Python than the rest of a small forward."""
        return self._derived_from_weight("_op_weight_args", lambda: weight_args(self.quantized_weight))

    def row_norms_squared(self) -> torch.Tensor:
        """||W_n||^2 of every output row n of the dequantized weight, fp64 [out_features]: W is frozen, so this is
        computed once (one dense fp32 dequantization) and cached until the weight is replaced or moved (DoRA's
        weight norm is built from it without a dense W per call)."""

        def compute():
            with torch.no_grad():
                return self.dequantized_weight(torch.float32).double().pow(2).sum(1)

        return self._derived_from_weight("_row_norms_squared", compute)

    def block_scales(self) -> torch.Tensor:
        """The fp32 scale of every quantization block (the double quantization decoded), cached like the others."""

        def compute():
            with torch.no_grad():
                return self.quantized_weight.fp32_scales().float().reshape(-1)

        return self._derived_from_weight("_block_scales", compute)

    _WEIGHT_CACHES = ("_op_weight_args", "_row_norms_squared", "_block_scales")

    def __getstate__(self):
        """Pickling and deepcopy leave the weight-derived caches out (rebuilt on use): they hold other-typed views
        of the weight's storage, which torch.save refuses, and a copy must derive them from its own weight."""
        return {k: v for k, v in self.__dict__.items() if k not in self._WEIGHT_CACHES}

    def _derived_from_weight(self, key: str, compute):
        """compute()'s value, cached under ``key`` (one of _WEIGHT_CACHES) for as long as ``self.weight`` is the same
        tensor; while torch.compile traces, computed in the graph with no cache."""
        if torch.compiler.is_compiling():
            return compute()
        cached = self.__dict__.get(key)
        if cached is None or cached[0] is not self.weight:
            cached = self.__dict__[key] = (self.weight, compute())
        return cached[1]

    def _drop_weight_caches(self) -> None:
        for key in self._WEIGHT_CACHES:
            self.__dict__.pop(key, None)

    def _apply(self, fn, recurse=True):  # .to() / .cuda() replace the tensors: drop what was derived from them
        self._drop_weight_caches()
        return super()._apply(fn, recurse)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.quantized_weight.dequantize(dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A dense nn.Linear with the dequantized weight (in ``dtype``, default the original weight dtype); a
        Conv1D when the layer was quantized from one."""
        return dense_layer(self.dequantized_weight(dtype), self.bias, self.fan_in_fan_out)

    # ---- forward ------------------------------------------------------------------------------------------
    @autocast_as_linear
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        F.check_layer_input(x, self.in_features, "Linear4bit", self.weight.device)
        dtype = self.compute_dtype or x.dtype
        y = frozen_4bit_linear(x.to(dtype), self.op_weight_args(), self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        q = self.quantized_weight
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={q.quant_type}, blocksize={q.blocksize}, double_quant={q.double_quant}, "
            f"compute_dtype={self.compute_dtype}"
        )

    # ---- bitsandbytes-compatible state dict ---------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, t in self.quantized_weight.state_dict(prefix + "weight").items():
            destination[key] = t if keep_vars else t.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        weight_key, bias_key = prefix + "weight", prefix + "bias"
        ours = [k for k in state_dict if k.startswith(prefix)]  # a leaf module: every key under prefix is its own
        weight_keys = {k for k in ours if k == weight_key or k.startswith(weight_key + ".")}
        if weight_key in state_dict:
            # a module built on the meta device takes the state dict's device instead of staying empty
            device = None if self.weight.device.type == "meta" else self.weight.device
            try:
                q = Quantized4bitWeight.from_state_dict(
                    {k: state_dict[k] for k in weight_keys}, weight_key, device=device
                )
                self.set_quantized_weight(q)
            except ValueError as e:
                error_msgs.append(str(e))
        else:
            missing_keys.append(weight_key)
        if self.bias is not None:
            if bias_key not in state_dict:
                missing_keys.append(bias_key)
            elif state_dict[bias_key].shape != self.bias.shape:
                error_msgs.append(
                    f"qpeft: '{bias_key}' has shape {list(state_dict[bias_key].shape)}, expected "
                    f"{list(self.bias.shape)}"
                )
            elif self.bias.device.type == "meta":
                bias = state_dict[bias_key].to(self.bias.dtype)
                self.bias = nn.Parameter(bias, requires_grad=self.bias.requires_grad)
            else:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bias_key])
        elif bias_key in state_dict:  # a bias the layer lacks (a BitFit bias, say) is never dropped silently
            unexpected_keys.append(bias_key)
        if strict:
            unexpected_keys.extend(k for k in ours if k not in weight_keys and k != bias_key)
