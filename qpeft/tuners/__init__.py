"""PEFT methods, one package each (config, model hooks; layers in qpeft/nn/), each registered in ``registry`` when
its package is imported (every package here is); targeting and modules_to_save are shared. The config classes are
re-exported as the public API."""

from .adalora import AdaLoraConfig
import importlib
import pkgutil

from . import registry
from .config import AdapterConfig, TaskType, config_from_peft_dict
from .ia3 import IA3Config
from .lora import CordaConfig, EvaConfig, LoftQConfig, LoraConfig
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

# every method package registers itself on import: a new package under tuners/ needs no line here
for _package in pkgutil.iter_modules(__path__):
    if _package.ispkg:
        importlib.import_module(f"{__name__}.{_package.name}")

__all__ = [
    "AdaLoraConfig",
    "AdapterConfig",
    "BitFitConfig",
    "BottleneckConfig",
    "config_from_peft_dict",
    "IA3Config",
    "LayerwiseConfig",
    "CordaConfig",
    "EvaConfig",
    "LoftQConfig",
    "LoraConfig",
    "MultitaskPromptTuningConfig",
    "PiggybackConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "registry",
    "SparseConfig",
    "TaskType",
]
