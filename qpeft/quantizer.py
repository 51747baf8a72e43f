"""qpeft as a transformers quantizer: ``AutoModelForCausalLM.from_pretrained(path, quantization_config=
qpeft.QuantizationConfig(...))`` quantizes each linear weight with qpeft's kernels as it is read (no bitsandbytes),
one float weight in memory at a time. Registered with transformers' API for external quantizers
(``register_quantization_config`` / ``register_quantizer``) under the method name "qpeft".

The layers are bitsandbytes' format, so the model's file form is bitsandbytes': ``save_pretrained`` writes a
bitsandbytes 4-bit checkpoint (its ``quantization_config`` is BitsAndBytesConfig's) that transformers +
bitsandbytes and ``qpeft.load_4bit_pretrained`` read.
"""

from __future__ import annotations

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import bitsandbytes_quantization_config
from .errors import ConfigError
from .files import release_file_pages
from .nn.linear4bit import Linear4bit, is_conv1d
from .quantized import Quantized4bitWeight
from .tuners.config import FORMAT_CHECKS, NAME_LIST, Check, check_fields
from .tuners.targets import quantizable_linears, set_submodule

METHOD = "qpeft"
QUANT_STORAGES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)
_STORAGE = Check(lambda v: v in QUANT_STORAGES, f"must be one of {list(QUANT_STORAGES)}")


@register_quantization_config(METHOD)
class QuantizationConfig(QuantizationConfigMixin):
    """The 4-bit format transformers loads a model into (bitsandbytes' meaning of each field): every linear layer
    but the output head, the tied ones, the model's fp32 modules and ``skip_modules`` (transformers' module-name
    patterns) becomes a qpeft ``Linear4bit``.

    Args:
        quant_type: "nf4" or "fp4". blocksize: 64 (bitsandbytes'), or another bitsandbytes block size.
        double_quant: 8-bit quantize the block scales. compute_dtype: of the matmuls (None: the input's).
        quant_storage: the dtype the packed bytes are stored as (uint8; a float dtype for FSDP).
    """

    CHECKS = {**FORMAT_CHECKS, "quant_storage": _STORAGE, "skip_modules": NAME_LIST}

    def __init__(
        self,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        quant_storage: torch.dtype = torch.uint8,
        skip_modules: list[str] | None = None,
        **kwargs,
    ):
        self.quant_method = METHOD
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype, self.quant_storage, self.skip_modules = compute_dtype, quant_storage, skip_modules
        self.weight_dtype = torch.float32  # the dtype the quantized weights had (set when they have loaded)
        check_fields(vars(self), self.CHECKS, "QuantizationConfig")
        if kwargs:
            raise ConfigError("QuantizationConfig", sorted(kwargs)[0], "is not a field of qpeft's QuantizationConfig")

    def to_dict(self) -> dict:
        """bitsandbytes' quantization_config (the layers are its format): what save_pretrained writes."""
        return bitsandbytes_quantization_config(
            self.quant_type,
            self.double_quant,
            self.compute_dtype or self.weight_dtype,
            self.quant_storage,
            self.skip_modules,
        )

    def __repr__(self) -> str:
        return f"QuantizationConfig({', '.join(f'{k}={getattr(self, k)!r}' for k in self.CHECKS)})"


@register_quantizer(METHOD)
class QPeftHfQuantizer(HfQuantizer):
    """transformers' side: before loading, the names of the linear layers to quantize are chosen (the model is on
    the meta device, its layers stay nn.Linear / Conv1D); as each of their weights is read, ``Quantize4bit`` makes
    the layer a Linear4bit holding it in 4 bits."""

    requires_calibration = False
    quantization_config: QuantizationConfig

    def __init__(self, quantization_config: QuantizationConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.targets: set[str] = set()
        self.loaded: dict[str, Quantized4bitWeight] = {}  # until the load ends (see _process_model_after_...)

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def validate_environment(self, *args, **kwargs):
        if self.pre_quantized:
            raise ValueError(
                "qpeft: this checkpoint is already quantized; a qpeft quantizer quantizes float checkpoints (read a "
                "bitsandbytes 4-bit checkpoint with qpeft.load_4bit_pretrained)"
            )

    def update_device_map(self, device_map):
        if device_map is None:
            device_map = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
        return device_map

    def _process_model_before_weight_loading(self, model, **kwargs):
        # qpeft's whole-model set, less transformers' default skips for quantizers (tied and last modules) and the
        # user's skip_modules
        skip = self.get_modules_to_not_convert(model, self.quantization_config.skip_modules, add_default_skips=True)
        self.targets = {name for name in quantizable_linears(model) if should_convert_module(name, skip)}

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, _, name = param_name.rpartition(".")
        return name == "weight" and module in self.targets

    def get_quantize_ops(self):
        return Quantize4bit(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        # transformers replaces every non-persistent buffer with an empty one after loading (to be recomputed by
        # _init_weights): a Linear4bit's scales are such buffers, so they are set again here
        for name, q in self.loaded.items():
            model.get_submodule(name).set_quantized_weight(q)
            self.quantization_config.weight_dtype = q.dtype
        self.loaded.clear()
        model.is_loaded_in_4bit = True  # what peft and transformers read to know a 4-bit base
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


class Quantize4bit(ConversionOps):
    """A target's float weight, as read from the checkpoint -> its layer made a Linear4bit (the layer's bias, loaded
    before or after, is kept)."""

    def __init__(self, quantizer: QPeftHfQuantizer):
        self.hf_quantizer = quantizer

    def convert(self, input_dict: dict, model=None, **kwargs) -> dict:
        config = self.hf_quantizer.quantization_config
        out = {}
        for param_name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            name = param_name.rpartition(".")[0]
            module = model.get_submodule(name)
            conv1d = is_conv1d(module)  # its weight is stored [in, out]: quantized transposed, as bitsandbytes does
            weight = value.T.contiguous() if conv1d else value
            q = Quantized4bitWeight.from_float(
                weight, config.quant_type, config.blocksize, config.double_quant, config.quant_storage
            )
            layer = Linear4bit.from_quantized(q, module.bias, config.compute_dtype, fan_in_fan_out=conv1d)
            release_file_pages(value)  # the float weight's checkpoint pages: not needed again
            layer._is_hf_initialized = True
            set_submodule(model, name, layer)
            self.hf_quantizer.loaded[name] = q
            out[param_name] = layer.weight
        return out
