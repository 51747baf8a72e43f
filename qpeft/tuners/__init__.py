"""PEFT methods, one package each (config, layers or encoders, model hooks), each registered in ``registry``
when its package is imported (here); targeting and modules_to_save are shared."""

from .adalora import AdaLoraConfig
from . import registry
from .config import AdapterConfig, config_from_peft_dict
from .ia3 import IA3Config
from .lora import LoraConfig
from .bottleneck import BottleneckConfig
from .piggyback import PiggybackConfig
from .selective import BitFitConfig, LayerwiseConfig
from .sparse import SparseConfig
from .prompt import (
    MultitaskPromptTuningConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptLearningConfig,
    PromptTuningConfig,
)

__all__ = [
    "AdaLoraConfig",
    "AdapterConfig",
    "BitFitConfig",
    "BottleneckConfig",
    "config_from_peft_dict",
    "IA3Config",
    "LayerwiseConfig",
    "LoraConfig",
    "MultitaskPromptTuningConfig",
    "PiggybackConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "registry",
    "SparseConfig",
]
