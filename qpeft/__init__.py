"""qpeft: parameter-efficient fine-tuning on 4-bit (NF4/FP4) quantized bases, with C++/CUDA kernels."""

from . import functional, reference
from ._ops import build_info
from .errors import ConfigError
from .quantized import Quantized4bitWeight

__version__ = build_info()["version"]
__all__ = ["AdaLoraConfig", "BitFitConfig", "BottleneckConfig", "build_info", "ConfigError", "distributed",
           "functional", "get_peft_model", "IA3Config", "LayerwiseConfig", "load_4bit_pretrained", "LoraConfig",
           "MultitaskPromptTuningConfig", "nn", "PiggybackConfig", "PrefixTuningConfig",
           "prepare_model_for_kbit_training", "PromptEncoderConfig", "PromptTuningConfig", "QPeftModel",
           "Quantized4bitWeight", "reference", "save_4bit_pretrained", "SparseConfig"]

from . import nn  # noqa: E402  (nn imports Quantized4bitWeight from this package)
from . import distributed  # noqa: E402
from .checkpoint import load_4bit_pretrained, save_4bit_pretrained  # noqa: E402
from .model import QPeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from .tuners import (AdaLoraConfig, BitFitConfig, BottleneckConfig, IA3Config, LayerwiseConfig,  # noqa: E402
                     LoraConfig, MultitaskPromptTuningConfig, PiggybackConfig, PrefixTuningConfig, PromptEncoderConfig,
                     PromptTuningConfig, SparseConfig)
