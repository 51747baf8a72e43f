"""Soft prompts on a 4-bit base: prompt tuning, P-tuning, prefix tuning, multitask prompt tuning."""

from ..registry import Method, register
from . import model
from .config import (
    MultitaskPromptTuningConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptLearningConfig,
    PromptTuningConfig,
)

__all__ = [
    "MultitaskPromptTuningConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptLearningConfig",
    "PromptTuningConfig",
]


def _register(config_class: type, name: str, examples: dict) -> None:
    register(
        Method(
            config_class,
            name,
            encoder=model.setup,
            forward=model.forward,
            generate=model.generate,
            starts_as_base=False,
            mergeable=False,
            examples=examples,
        )
    )


_register(
    PromptTuningConfig,
    "prompt-tuning",
    {"default": lambda r=4, steps=10: PromptTuningConfig(num_virtual_tokens=r, prompt_tuning_init="SAMPLE_VOCAB")},
)
_register(
    PromptEncoderConfig,
    "p-tuning",
    {
        "default": lambda r=4, steps=10: PromptEncoderConfig(num_virtual_tokens=r, encoder_hidden_size=32),
        "lstm": lambda r=4, steps=10: PromptEncoderConfig(
            num_virtual_tokens=r, encoder_hidden_size=32, encoder_reparameterization_type="LSTM"
        ),
    },
)
_register(
    PrefixTuningConfig,
    "prefix-tuning",
    {
        "default": lambda r=4, steps=10: PrefixTuningConfig(num_virtual_tokens=r),
        "projection": lambda r=4, steps=10: PrefixTuningConfig(
            num_virtual_tokens=r, prefix_projection=True, encoder_hidden_size=32
        ),
    },
)
_register(
    MultitaskPromptTuningConfig,
    "multitask-prompt-tuning",
    {"default": lambda r=4, steps=10: MultitaskPromptTuningConfig(num_virtual_tokens=r, num_tasks=2, num_ranks=4)},
)
