"""qpeft: parameter-efficient fine-tuning on 4-bit (NF4/FP4) quantized bases, with C++/CUDA kernels."""

from . import functional, reference
from ._ops import build_info
from .errors import ConfigError
from .quantized import Quantized4bitWeight

__version__ = build_info()["version"]
__all__ = ["AdaLoraConfig", "ConfigError", "IA3Config", "load_4bit_pretrained", "save_4bit_pretrained", "LoraConfig",
           "MultitaskPromptTuningConfig", "PrefixTuningConfig", "PromptEncoderConfig", "PromptTuningConfig",
           "QPeftModel", "Quantized4bitWeight", "build_info", "functional", "get_peft_model", "nn",
           "prepare_model_for_kbit_training", "reference"]

from . import nn  # noqa: E402  (nn imports Quantized4bitWeight from this package)
from .checkpoint import load_4bit_pretrained, save_4bit_pretrained  # noqa: E402
from .model import QPeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from .tuners import (AdaLoraConfig, IA3Config, LoraConfig, MultitaskPromptTuningConfig,  # noqa: E402
                     PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig)
