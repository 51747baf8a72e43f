"""Soft prompts on a 4-bit base: prompt tuning, P-tuning, prefix tuning, multitask prompt tuning."""

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
