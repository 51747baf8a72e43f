"""qpeft: parameter-efficient fine-tuning on 4-bit (NF4/FP4) quantized bases, with C++/CUDA kernels."""

from . import distributed, functional, nn, reference
from ._ops import build_info
from .checkpoint import load_4bit_pretrained, save_4bit_pretrained
from .errors import ConfigError
from .model import (
    AutoPeftModelForCausalLM,
    PeftModel,
    PeftModelForCausalLM,
    QPeftModel,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from .quantized import Quantized4bitWeight
from .tuners.lora.corda import preprocess_corda
from .tuners.lora.eva import get_eva_state_dict, initialize_lora_eva_weights
from .tuners.lora.model import initialize_lora_weights, replace_lora_weights_loftq
from .tuners import (
    AdaLoraConfig,
    AdapterConfig,
    BitFitConfig,
    BottleneckConfig,
    IA3Config,
    CordaConfig,
    EvaConfig,
    LayerwiseConfig,
    LoftQConfig,
    LoraConfig,
    MultitaskPromptTuningConfig,
    PiggybackConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    SparseConfig,
    TaskType,
)

PeftConfig = AdapterConfig  # peft's name: PeftConfig.from_pretrained(folder) reads any adapter's config

__version__ = build_info()["version"]


def __getattr__(name: str):
    if name == "QuantizationConfig":  # imported on first use: registering it with transformers imports transformers
        from .quantizer import QuantizationConfig

        return QuantizationConfig
    raise AttributeError(f"module 'qpeft' has no attribute {name!r}")


__all__ = [
    "AdaLoraConfig",
    "AdapterConfig",
    "AutoPeftModelForCausalLM",
    "BitFitConfig",
    "BottleneckConfig",
    "build_info",
    "ConfigError",
    "distributed",
    "functional",
    "get_eva_state_dict",
    "get_peft_model",
    "initialize_lora_eva_weights",
    "initialize_lora_weights",
    "IA3Config",
    "CordaConfig",
    "EvaConfig",
    "LayerwiseConfig",
    "LoftQConfig",
    "load_4bit_pretrained",
    "LoraConfig",
    "preprocess_corda",
    "replace_lora_weights_loftq",
    "MultitaskPromptTuningConfig",
    "nn",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PiggybackConfig",
    "PrefixTuningConfig",
    "prepare_model_for_kbit_training",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "QPeftModel",
    "QuantizationConfig",
    "Quantized4bitWeight",
    "reference",
    "save_4bit_pretrained",
    "SparseConfig",
    "TaskType",
]
