"""peft's prompt-learning configs: prompt tuning, P-tuning, prefix tuning, multitask prompt tuning.

``num_layers``, ``token_dim``, ``num_attention_heads`` and ``encoder_hidden_size`` left None are read from the
model when the adapter is added (``fill_from_model``), as peft does; prefix tuning on grouped-query attention
sizes its key/value blocks by the key/value heads.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import ClassVar

from ...errors import ConfigError
from ..config import (
    BOOL,
    COUNT,
    MODEL_SIZE_NAMES,
    SIZE,
    STRING,
    Check,
    WholeModelConfig,
    checked,
    model_size,
    number_in,
    one_of,
    optional,
    text_config,
)

MODEL_SIZE = optional(SIZE, " (read from the model)")


def _name(v):
    return v.value if isinstance(v, enum.Enum) else v


@dataclasses.dataclass
class PromptLearningConfig(WholeModelConfig):
    """Fields of every prompt-learning method (and qpeft's ``quantize``)."""

    is_prompt_learning: ClassVar[bool] = True

    num_virtual_tokens: int | None = checked(None, SIZE)
    token_dim: int | None = checked(None, MODEL_SIZE)
    num_transformer_submodules: int | None = checked(
        None, Check(lambda v: v in (None, 1, 2), "must be 1 (decoder-only) or 2 (encoder-decoder)")
    )
    num_attention_heads: int | None = checked(None, MODEL_SIZE)
    num_layers: int | None = checked(None, MODEL_SIZE)
    modules_to_save: list[str] | None = checked(
        None, Check(lambda v: not v, "is not supported with prompt learning in qpeft")
    )

    def check_together(self, source: str | None = None) -> None:
        super().check_together(source)
        if self.task_type not in (None, "CAUSAL_LM", "SEQ_2_SEQ_LM"):
            self.fail(
                "task_type", "must be 'CAUSAL_LM', 'SEQ_2_SEQ_LM' or null (qpeft's prompt learning is for LMs)", source
            )
        if self.num_transformer_submodules == 2 and self.task_type not in (None, "SEQ_2_SEQ_LM"):
            self.fail("num_transformer_submodules", "is 2 (an encoder and a decoder) only for 'SEQ_2_SEQ_LM'", source)

    @property
    def total_virtual_tokens(self) -> int:
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)

    def fill_from_model(self, model_config) -> None:
        """Sizes left None, from a transformers config (its text config for multimodal models), then checked
        against it."""
        seq2seq = bool(getattr(model_config, "is_encoder_decoder", False))
        self.task_type = self.task_type or ("SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM")
        if (self.task_type == "SEQ_2_SEQ_LM") != seq2seq:
            kind = "an encoder-decoder" if seq2seq else "a decoder-only"
            raise ConfigError(None, "task_type", f"is {self.task_type!r}, but the model is {kind} model")
        # peft's rule: one set of virtual tokens per transformer stack (an encoder-decoder's decoder set is used
        # by multitask prompt tuning alone)
        self.num_transformer_submodules = self.num_transformer_submodules or (2 if seq2seq else 1)
        for key in MODEL_SIZE_NAMES:
            if getattr(self, key) is None:
                value = model_size(model_config, key)
                if value is None:
                    raise ConfigError(None, key, "is not in the model's config: set it in the adapter config")
                setattr(self, key, value)
        text = text_config(model_config)
        self.fill_method_sizes(text)
        self.validate()
        for key, (expected, what) in self.model_sizes(model_config).items():
            if expected is not None and getattr(self, key) != expected:
                raise ConfigError(None, key, f"is {getattr(self, key)}, but the model has {expected} ({what})")
        positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        if positions is not None and self.num_virtual_tokens >= positions:
            raise ConfigError(
                None, "num_virtual_tokens", f"is {self.num_virtual_tokens}, not below the model's {positions} positions"
            )

    def model_sizes(self, model_config) -> dict:
        """key -> (the size the model requires, what it is) for the sizes that must fit the model."""
        return {
            "num_layers": (model_size(model_config, "num_layers"), "layers"),
            "token_dim": (model_size(model_config, "token_dim"), "hidden size"),
        }

    def fill_method_sizes(self, text_config) -> None:
        """Method-specific sizes derived from the model (a subclass's)."""


@dataclasses.dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Soft prompt: ``num_virtual_tokens`` trained embeddings put before the input. Init "RANDOM" (N(0, 1)),
    "TEXT" (the embeddings of ``prompt_tuning_init_text`` tokenized by ``tokenizer_name_or_path``, repeated or cut
    to length) or "SAMPLE_VOCAB" (embeddings of random vocabulary tokens)."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    INITS: ClassVar[tuple[str, ...]] = ("RANDOM", "TEXT", "SAMPLE_VOCAB")

    prompt_tuning_init: str = checked("RANDOM", one_of(*INITS))
    prompt_tuning_init_text: str | None = checked(None, optional(STRING))
    tokenizer_name_or_path: str | None = checked(None, optional(STRING))
    tokenizer_kwargs: dict | None = checked(
        None, Check(lambda v: v is None or isinstance(v, dict), "must be an object or null")
    )

    def __post_init__(self):
        self.prompt_tuning_init = _name(self.prompt_tuning_init)
        super().__post_init__()

    def check_together(self, source: str | None = None) -> None:
        super().check_together(source)
        if self.prompt_tuning_init == "TEXT" and not self.inference_mode:
            if not self.tokenizer_name_or_path:
                self.fail("tokenizer_name_or_path", "is required with prompt_tuning_init 'TEXT'", source)
            if not self.prompt_tuning_init_text:
                self.fail("prompt_tuning_init_text", "is required with prompt_tuning_init 'TEXT'", source)
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            self.fail("tokenizer_kwargs", "only applies with prompt_tuning_init 'TEXT' (as in peft)", source)


@dataclasses.dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: virtual-token embeddings reparameterized by an MLP (Linear-ReLU-Linear-ReLU-Linear) or a
    bidirectional LSTM + MLP head. peft's file holds the encoder's output, so a loaded adapter is the output."""

    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = checked("MLP", one_of("MLP", "LSTM"))
    encoder_hidden_size: int | None = checked(None, optional(SIZE, " (token_dim)"))
    encoder_num_layers: int = checked(2, SIZE)
    encoder_dropout: float = checked(0.0, number_in(0, 1, closed_high=False))

    def __post_init__(self):
        self.encoder_reparameterization_type = _name(self.encoder_reparameterization_type)
        super().__post_init__()

    def fill_method_sizes(self, text_config) -> None:
        self.encoder_hidden_size = self.encoder_hidden_size or self.token_dim


@dataclasses.dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: trained keys and values for ``num_virtual_tokens`` positions in every attention layer,
    optionally produced by an MLP (``prefix_projection``: Linear-Tanh-Linear of width ``encoder_hidden_size``);
    ``init_weights`` "zero" starts them at zero."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    encoder_hidden_size: int | None = checked(None, optional(SIZE, " (token_dim)"))
    prefix_projection: bool = checked(False, BOOL)
    init_weights: str | None = checked(None, Check(lambda v: v in (None, "zero"), "must be null or 'zero'"))

    def check_together(self, source: str | None = None) -> None:
        super().check_together(source)
        if (
            self.token_dim is not None
            and self.num_attention_heads is not None
            and self.token_dim % self.num_attention_heads
        ):
            self.fail("token_dim", f"must be a multiple of num_attention_heads ({self.num_attention_heads})", source)

    def fill_from_model(self, model_config) -> None:
        if getattr(model_config, "is_encoder_decoder", False):  # (an encoder-decoder prefix is 3 caches a layer)
            raise ConfigError(None, "peft_type", "PREFIX_TUNING on encoder-decoder models is not supported by qpeft")
        # left None, token_dim and num_attention_heads are the key / value heads' (peft's rule for grouped-query
        # attention, applied only when the sizes come from the model)
        if self.token_dim is None and self.num_attention_heads is None:
            sizes = self.model_sizes(model_config)
            self.token_dim = sizes["token_dim"][0]
            self.num_attention_heads = sizes.get("num_attention_heads", (None,))[0]
        super().fill_from_model(model_config)

    def fill_method_sizes(self, text_config) -> None:
        self.encoder_hidden_size = self.encoder_hidden_size or self.token_dim

    def model_sizes(self, model_config) -> dict:
        """The prefix's blocks are key/value blocks: the key/value heads and their width."""
        sizes = super().model_sizes(model_config)
        heads, hidden = model_size(model_config, "num_attention_heads"), sizes["token_dim"][0]
        if heads and hidden:
            text = text_config(model_config)
            kv_heads = getattr(text, "num_key_value_heads", None) or heads
            head_dim = getattr(text, "head_dim", None) or hidden // heads
            sizes["token_dim"] = (head_dim * kv_heads, "key/value heads x head size")
            sizes["num_attention_heads"] = (kv_heads, "key/value heads")
        return sizes


@dataclasses.dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """Multitask prompt tuning: a shared soft prompt times a rank-``num_ranks`` task matrix
    (prefix_task_cols[task] @ prefix_task_rows[task]) per task; forward takes ``task_ids``. Inits from a source
    run's safetensors file (``prompt_tuning_init_state_dict_path``): AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK
    (task ``prompt_tuning_init_task``), ONLY_SOURCE_SHARED (the shared prompt only)."""

    peft_type: ClassVar[str] = "MULTITASK_PROMPT_TUNING"
    INITS: ClassVar[tuple[str, ...]] = (
        "RANDOM",
        "TEXT",
        "AVERAGE_SOURCE_TASKS",
        "EXACT_SOURCE_TASK",
        "ONLY_SOURCE_SHARED",
    )
    SOURCE_INITS: ClassVar[tuple[str, ...]] = ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")

    prompt_tuning_init: str = checked("RANDOM", one_of(*INITS))
    prompt_tuning_init_state_dict_path: str | None = checked(None, optional(STRING))
    prompt_tuning_init_task: int = checked(0, Check(COUNT.accepts, "must be a task index"))
    num_ranks: int = checked(1, SIZE)
    num_tasks: int = checked(1, SIZE)

    def check_together(self, source: str | None = None) -> None:
        super().check_together(source)
        path = self.prompt_tuning_init_state_dict_path
        if self.prompt_tuning_init in self.SOURCE_INITS and not self.inference_mode:
            if path is None:
                self.fail(
                    "prompt_tuning_init_state_dict_path",
                    f"is required with prompt_tuning_init {self.prompt_tuning_init!r}",
                    source,
                )
            if not path.endswith(".safetensors"):
                self.fail(
                    "prompt_tuning_init_state_dict_path", "must be a .safetensors file (qpeft never unpickles)", source
                )
