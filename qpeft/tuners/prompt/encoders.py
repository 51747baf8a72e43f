"""The trained part of each prompt-learning method: a module whose ``prompt()`` gives the virtual tokens'
embeddings [T, token_dim] (prefix tuning: the keys and values of every layer [T, num_layers * 2 * token_dim];
multitask: [batch, T, token_dim] for the given task ids).

A ``loaded`` encoder (an adapter read from peft's file, which holds the reparameterized output) is that output as
one trainable embedding, as in peft's inference mode."""

from __future__ import annotations

import math

import torch
from safetensors.torch import load_file
from torch import nn

from ...errors import ConfigError
from .config import (
    MultitaskPromptTuningConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptLearningConfig,
    PromptTuningConfig,
)


def _init_token_ids(config: PromptTuningConfig, vocab_size: int, n: int) -> torch.Tensor | None:
    """The vocabulary ids whose embeddings start the prompt (TEXT, SAMPLE_VOCAB), or None (RANDOM)."""
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (n,))
    if config.prompt_tuning_init != "TEXT":
        return None
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # never run code from a tokenizer folder
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError(None, "prompt_tuning_init_text", "tokenizes to no token")
    ids = (ids * math.ceil(n / len(ids)))[:n]  # repeated or cut to the prompt's length, as in peft
    return torch.tensor(ids, dtype=torch.long)


class PromptEmbedding(nn.Module):
    """Prompt tuning: the prompt is ``embedding.weight`` itself."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding | None, loaded: bool = False):
        super().__init__()
        total = config.total_virtual_tokens
        self.embedding = nn.Embedding(total, config.token_dim)
        if not loaded and word_embeddings is not None:
            ids = _init_token_ids(config, word_embeddings.num_embeddings, total)
            if ids is not None:
                with torch.no_grad():
                    w = word_embeddings(ids.to(word_embeddings.weight.device)).float()
                self.embedding.weight = nn.Parameter(w.detach().clone())

    def prompt(self) -> torch.Tensor:
        return self.embedding.weight

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prompt()}


class PromptEncoder(nn.Module):
    """P-tuning: embeddings through an MLP (or a bidirectional LSTM and an MLP head)."""

    def __init__(self, config: PromptEncoderConfig, loaded: bool = False):
        super().__init__()
        d, h = config.token_dim, config.encoder_hidden_size
        self.embedding = nn.Embedding(config.total_virtual_tokens, d)
        self.kind = None if loaded else config.encoder_reparameterization_type
        if self.kind == "LSTM":
            self.lstm_head = nn.LSTM(
                d,
                h,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        elif self.kind == "MLP":
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def prompt(self) -> torch.Tensor:
        e = self.embedding.weight
        if self.kind == "LSTM":
            with torch.autocast(e.device.type, enabled=False):  # in its own dtype: CPU autocast has no fp16 LSTM
                hidden = self.lstm_head(e[None])[0]
            return self.mlp_head(hidden)[0]
        if self.kind == "MLP":
            return self.mlp_head(e)
        return e

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prompt()}


class PrefixEncoder(nn.Module):
    """Prefix tuning: per virtual token, the keys and values of every layer [num_layers * 2 * token_dim], trained
    directly or produced by Linear-Tanh-Linear (``prefix_projection``)."""

    def __init__(self, config: PrefixTuningConfig, loaded: bool = False):
        super().__init__()
        d, width = config.token_dim, config.num_layers * 2 * config.token_dim
        self.projected = config.prefix_projection and not loaded
        self.num_layers = config.num_layers
        if self.projected:
            self.embedding = nn.Embedding(config.num_virtual_tokens, d)
            self.transform = nn.Sequential(
                nn.Linear(d, config.encoder_hidden_size), nn.Tanh(), nn.Linear(config.encoder_hidden_size, width)
            )
            last = self.transform[-1]
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            last = self.embedding
        if config.init_weights == "zero" and not loaded:
            with torch.no_grad():
                for p in last.parameters():
                    p.zero_()

    def prompt(self) -> torch.Tensor:
        e = self.embedding.weight
        return self.transform(e) if self.projected else e

    def layer_prompt(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s keys and values [T, 2 * token_dim], from a graph of its own: under reentrant
        checkpointing each layer's backward runs alone and frees what it traversed."""
        width = self.embedding.weight.shape[1] if not self.projected else self.transform[-1].out_features
        cols = slice(layer * width // self.num_layers, (layer + 1) * width // self.num_layers)
        if not self.projected:
            return self.embedding.weight[:, cols]
        last = self.transform[-1]
        return nn.functional.linear(self.transform[:-1](self.embedding.weight), last.weight[cols], last.bias[cols])

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prompt()}


class MultitaskPromptEmbedding(PromptEmbedding):
    """Multitask prompt tuning: shared prompt * (prefix_task_cols[task] @ prefix_task_rows[task])."""

    def __init__(self, config: MultitaskPromptTuningConfig, word_embeddings: nn.Embedding | None, loaded: bool = False):
        source = config.prompt_tuning_init in config.SOURCE_INITS
        super().__init__(config, None if source else word_embeddings, loaded)
        total = config.total_virtual_tokens
        self.prefix_task_cols = nn.Parameter(torch.normal(0.0, 0.02, (config.num_tasks, total, config.num_ranks)))
        self.prefix_task_rows = nn.Parameter(
            torch.normal(0.0, 0.02, (config.num_tasks, config.num_ranks, config.token_dim))
        )
        if source and not loaded:
            self._init_from_source(config)

    @torch.no_grad()
    def _init_from_source(self, config: MultitaskPromptTuningConfig) -> None:
        path = config.prompt_tuning_init_state_dict_path
        source = load_file(path)
        key = "prompt_tuning_init_state_dict_path"
        missing = [k for k in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows") if k not in source]
        if missing:
            raise ConfigError(path, key, f"lacks {missing}")
        self._copy(self.embedding.weight, source["prompt_embeddings"], path)
        if config.prompt_tuning_init == "ONLY_SOURCE_SHARED":
            return
        cols, rows = source["prefix_task_cols"], source["prefix_task_rows"]
        if config.prompt_tuning_init == "AVERAGE_SOURCE_TASKS":
            cols, rows = cols.mean(0), rows.mean(0)
        else:
            if config.prompt_tuning_init_task >= cols.shape[0]:
                raise ConfigError(
                    path,
                    "prompt_tuning_init_task",
                    f"is {config.prompt_tuning_init_task} but the source has {cols.shape[0]} tasks",
                )
            cols, rows = cols[config.prompt_tuning_init_task], rows[config.prompt_tuning_init_task]
        # every target task starts from the chosen source task (peft: num_tasks must be 1)
        self._copy(self.prefix_task_cols, cols, path)
        self._copy(self.prefix_task_rows, rows, path)

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, path: str) -> None:
        try:
            src = src.expand_as(dst)
        except RuntimeError:
            raise ConfigError(
                path,
                "prompt_tuning_init_state_dict_path",
                f"holds shape {list(src.shape)} where {list(dst.shape)} is needed",
            ) from None
        dst.copy_(src)

    def task_prompt(self, task_ids: torch.Tensor) -> torch.Tensor:
        """[batch, T, token_dim] for ``task_ids`` [batch]."""
        cols = self.prefix_task_cols.index_select(0, task_ids)
        rows = self.prefix_task_rows.index_select(0, task_ids)
        return self.embedding.weight * (cols @ rows)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeddings": self.embedding.weight,
            "prefix_task_cols": self.prefix_task_cols,
            "prefix_task_rows": self.prefix_task_rows,
        }


def make_encoder(config: PromptLearningConfig, word_embeddings: nn.Embedding | None, loaded: bool) -> nn.Module:
    if isinstance(config, MultitaskPromptTuningConfig):
        return MultitaskPromptEmbedding(config, word_embeddings, loaded)
    if isinstance(config, PromptTuningConfig):
        return PromptEmbedding(config, word_embeddings, loaded)
    if isinstance(config, PromptEncoderConfig):
        return PromptEncoder(config, loaded)
    if isinstance(config, PrefixTuningConfig):
        return PrefixEncoder(config, loaded)
    raise TypeError(f"qpeft: no prompt encoder for {type(config).__name__}")
