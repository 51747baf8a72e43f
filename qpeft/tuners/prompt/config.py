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
from ..config import WholeModelConfig, is_int, is_number


def _name(v):
    return v.value if isinstance(v, enum.Enum) else v


@dataclasses.dataclass
class PromptLearningConfig(WholeModelConfig):
    """Fields of every prompt-learning method (and qpeft's ``quantize``)."""

    is_prompt_learning: ClassVar[bool] = True

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def validate(self, source: str | None = None) -> None:
        super().validate(source)
        if not is_int(self.num_virtual_tokens) or self.num_virtual_tokens <= 0:
            self.fail("num_virtual_tokens", "must be a positive integer", source)
        for key in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, key)
            if value is not None and (not is_int(value) or value <= 0):
                self.fail(key, "must be a positive integer or null (read from the model)", source)
        if self.num_transformer_submodules not in (None, 1):
            self.fail(
                "num_transformer_submodules",
                "must be 1 (qpeft's prompt learning is for decoder-only causal LMs)",
                source,
            )
        if self.task_type not in (None, "CAUSAL_LM"):
            self.fail("task_type", "must be 'CAUSAL_LM' or null (qpeft's prompt learning is for causal LMs)", source)
        if self.modules_to_save:
            self.fail("modules_to_save", "is not supported with prompt learning in qpeft", source)

    @property
    def total_virtual_tokens(self) -> int:
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)

    def fill_from_model(self, model_config) -> None:
        """Sizes left None, from a transformers config (its text config for multimodal models)."""
        get_text = getattr(model_config, "get_text_config", None)
        text = get_text() if callable(get_text) else model_config

        def read(*names):
            for name in names:
                value = getattr(text, name, None)
                if value is not None:
                    return value
            return None

        self.num_transformer_submodules = self.num_transformer_submodules or 1
        self.task_type = self.task_type or "CAUSAL_LM"
        for key, names in (
            ("num_layers", ("num_hidden_layers", "num_layers", "n_layer")),
            ("token_dim", ("hidden_size", "n_embd", "d_model")),
            ("num_attention_heads", ("num_attention_heads", "n_head", "num_heads")),
        ):
            if getattr(self, key) is None:
                value = read(*names)
                if value is None:
                    raise ConfigError(None, key, "is not in the model's config: set it in the adapter config")
                setattr(self, key, value)
        self.fill_method_sizes(text)
        self.validate()

    def fill_method_sizes(self, text_config) -> None:
        """Method-specific sizes derived from the model (a subclass's)."""


@dataclasses.dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Soft prompt: ``num_virtual_tokens`` trained embeddings put before the input. Init "RANDOM" (N(0, 1)),
    "TEXT" (the embeddings of ``prompt_tuning_init_text`` tokenized by ``tokenizer_name_or_path``, repeated or cut
    to length) or "SAMPLE_VOCAB" (embeddings of random vocabulary tokens)."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    INITS: ClassVar[tuple[str, ...]] = ("RANDOM", "TEXT", "SAMPLE_VOCAB")

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self):
        self.prompt_tuning_init = _name(self.prompt_tuning_init)
        super().__post_init__()

    def validate(self, source: str | None = None) -> None:
        super().validate(source)
        if self.prompt_tuning_init not in self.INITS:
            self.fail("prompt_tuning_init", f"must be one of {list(self.INITS)}", source)
        for key in ("prompt_tuning_init_text", "tokenizer_name_or_path"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                self.fail(key, "must be a string or null", source)
        if self.tokenizer_kwargs is not None and not isinstance(self.tokenizer_kwargs, dict):
            self.fail("tokenizer_kwargs", "must be an object or null", source)
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

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self):
        self.encoder_reparameterization_type = _name(self.encoder_reparameterization_type)
        super().__post_init__()

    def validate(self, source: str | None = None) -> None:
        super().validate(source)
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            self.fail("encoder_reparameterization_type", "must be 'MLP' or 'LSTM'", source)
        if self.encoder_hidden_size is not None and (
            not is_int(self.encoder_hidden_size) or self.encoder_hidden_size <= 0
        ):
            self.fail("encoder_hidden_size", "must be a positive integer or null (token_dim)", source)
        if not is_int(self.encoder_num_layers) or self.encoder_num_layers <= 0:
            self.fail("encoder_num_layers", "must be a positive integer", source)
        if not is_number(self.encoder_dropout) or not 0 <= self.encoder_dropout < 1:
            self.fail("encoder_dropout", "must be a number in [0, 1)", source)

    def fill_method_sizes(self, text_config) -> None:
        self.encoder_hidden_size = self.encoder_hidden_size or self.token_dim


@dataclasses.dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: trained keys and values for ``num_virtual_tokens`` positions in every attention layer,
    optionally produced by an MLP (``prefix_projection``: Linear-Tanh-Linear of width ``encoder_hidden_size``);
    ``init_weights`` "zero" starts them at zero."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def validate(self, source: str | None = None) -> None:
        super().validate(source)
        if self.encoder_hidden_size is not None and (
            not is_int(self.encoder_hidden_size) or self.encoder_hidden_size <= 0
        ):
            self.fail("encoder_hidden_size", "must be a positive integer or null (token_dim)", source)
        if not isinstance(self.prefix_projection, bool):
            self.fail("prefix_projection", "must be true or false", source)
        if self.init_weights not in (None, "zero"):
            self.fail("init_weights", "must be null or 'zero'", source)
        if (
            self.token_dim is not None
            and self.num_attention_heads is not None
            and self.token_dim % self.num_attention_heads
        ):
            self.fail("token_dim", f"must be a multiple of num_attention_heads ({self.num_attention_heads})", source)

    def fill_from_model(self, model_config) -> None:
        # grouped-query attention: the prefix's blocks have the key/value heads' width (peft's rule, applied only
        # when the sizes come from the model)
        get_text = getattr(model_config, "get_text_config", None)
        text = get_text() if callable(get_text) else model_config
        kv_heads = getattr(text, "num_key_value_heads", None)
        if kv_heads is not None and self.token_dim is None and self.num_attention_heads is None:
            heads = getattr(text, "num_attention_heads")
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
            self.token_dim, self.num_attention_heads = head_dim * kv_heads, kv_heads
        super().fill_from_model(model_config)

    def fill_method_sizes(self, text_config) -> None:
        self.encoder_hidden_size = self.encoder_hidden_size or self.token_dim


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

    prompt_tuning_init_state_dict_path: str | None = None
    prompt_tuning_init_task: int = 0
    num_ranks: int = 1
    num_tasks: int = 1

    def validate(self, source: str | None = None) -> None:
        super().validate(source)
        for key in ("num_ranks", "num_tasks"):
            if not is_int(getattr(self, key)) or getattr(self, key) <= 0:
                self.fail(key, "must be a positive integer", source)
        if not is_int(self.prompt_tuning_init_task) or self.prompt_tuning_init_task < 0:
            self.fail("prompt_tuning_init_task", "must be a task index", source)
        path = self.prompt_tuning_init_state_dict_path
        if path is not None and not isinstance(path, str):
            self.fail("prompt_tuning_init_state_dict_path", "must be a string or null", source)
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
