"""CorDA (context-oriented decomposition adaptation), peft's ``init_lora_weights="corda"``: each target layer's
input covariance C over calibration data (``run_model``) orients the decomposition W C = U diag(S) V'^T, V^T =
V'^T C^-1; the adapter starts at the r components with the largest ("ipm") or smallest ("kpm") singular values and
the residual W - U diag(S) V^T is what is quantized. ``preprocess_corda`` runs on the float model before
``get_peft_model`` (peft's order), keeping each layer's (S, U, V) on the layer until the adapter takes it.

Differences from peft: cache and covariance files are safetensors (peft's are pickle, never loaded here); a layer's
input may hold several sequences (peft's hook needs batches of one); the damping that makes C invertible doubles at
most MAX_DAMPING_STEPS times, then the layer is refused by name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ...files import write_safetensors_atomic
from ...nn.linear4bit import is_conv1d
from .. import targets
from .config import LoraConfig

EIGENS = "corda_eigens"  # the attribute a preprocessed layer keeps (S, U, V) under
MAX_DAMPING_STEPS = 30
INVERSE_TOLERANCE = 0.05


def _targets(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    layers = {n: model.get_submodule(n) for n in targets.find_target_modules(model, config)}
    quantized = [n for n, m in layers.items() if not (isinstance(m, nn.Linear) or is_conv1d(m))]
    if quantized:
        raise ValueError(f"qpeft: CorDA preprocesses the float model before get_peft_model; 4-bit already: {quantized}")
    return layers


def _weight(module: nn.Module) -> torch.Tensor:
    W = module.weight.detach().float()
    return W.T if is_conv1d(module) else W


@torch.no_grad()
def preprocess_corda(
    model: nn.Module, lora_config: LoraConfig, run_model: Callable[[], None] | None = None, hooked_model=None
) -> None:
    """peft's preprocess_corda: every layer ``lora_config`` targets gets its CorDA decomposition, cropped to its
    rank; from ``corda_config.cache_file`` when it exists, else from the input covariances (``covariance_file``
    when it exists, else measured while ``run_model()`` runs ``hooked_model``, default ``model``), and written to
    the files named."""
    corda = lora_config.corda_config
    if corda is None:
        raise ValueError("qpeft: preprocess_corda needs lora_config.corda_config (init_lora_weights='corda')")
    layers = _targets(model, lora_config)
    if not layers:
        raise ValueError("qpeft: the config targets no layer of the model")
    ranks = {n: targets.pattern_value(n, lora_config.rank_pattern, lora_config.r, "rank_pattern") for n in layers}
    cache = _read(corda.cache_file)
    if cache is not None:
        for name, module in layers.items():
            eigens = tuple(cache.get(f"{name}.eigens.{part}") for part in ("S_WC", "U_WC", "V_WC"))
            if any(t is None for t in eigens):
                raise KeyError(f"qpeft: the CorDA cache {corda.cache_file} holds no decomposition of {name}")
            _check_eigens(name, module, eigens, ranks[name])
            setattr(module, EIGENS, eigens)
        return
    covariances = _read(corda.covariance_file)
    if covariances is None:
        covariances = _measure(model, layers, run_model, hooked_model, corda.use_float16_for_covariance)
        if corda.covariance_file is not None:
            write_safetensors_atomic(Path(corda.covariance_file), {n: c.contiguous() for n, c in covariances.items()})
    missing = sorted(set(layers) - set(covariances))
    if missing:
        raise KeyError(f"qpeft: no input covariance for {missing}")
    saved = {}
    for name, module in layers.items():
        S, U, V = decompose(name, _weight(module), covariances[name].float())
        keep = slice(None, ranks[name]) if corda.corda_method == "ipm" else slice(-ranks[name], None)
        eigens = (S[keep].contiguous(), U[:, keep].contiguous(), V[:, keep].contiguous())
        setattr(module, EIGENS, eigens)
        saved.update({f"{name}.eigens.{part}": t for part, t in zip(("S_WC", "U_WC", "V_WC"), eigens)})
    if corda.cache_file is not None:
        write_safetensors_atomic(Path(corda.cache_file), saved)


def _read(path) -> dict | None:
    if path is None or not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    try:
        return load_file(path)
    except Exception as e:  # a pickle file from peft, or a damaged one
        raise ValueError(f"qpeft: {path} is not a safetensors file ({e}); qpeft never loads pickle") from None


def _measure(model, layers: dict, run_model, hooked_model, half: bool) -> dict[str, torch.Tensor]:
    """Each layer's mean over forward calls of X^T X, X its input rows scaled by 1 / |max(X)| (peft's)."""
    if run_model is None:
        raise ValueError("qpeft: preprocess_corda needs run_model when no covariance or cache file exists")
    hooked = hooked_model if hooked_model is not None else model
    sums, counts, handles = {}, dict.fromkeys(layers, 0), []

    def hook_for(name):
        def hook(module, args, output):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            x = x if half else x.float()
            x = x / x.max().abs()
            if not torch.isfinite(x).all():
                raise ValueError(f"qpeft: CorDA met a non-finite input at {name}")
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] += 1

        return hook

    was = hooked.training
    hooked.eval()
    try:
        for name in layers:
            handles.append(hooked.get_submodule(name).register_forward_hook(hook_for(name)))
        run_model()
    finally:
        for h in handles:
            h.remove()
        hooked.train(was)
    unseen = sorted(n for n, c in counts.items() if c == 0)
    if unseen:
        raise ValueError(f"qpeft: run_model never reached the layers {unseen}")
    return {n: sums[n] / counts[n] for n in layers}


def decompose(name: str, W: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S, U, V) with W = U diag(S) V^T: the SVD of W (C + dI) (d doubled from 1% of C's mean diagonal until the
    inverse is accurate), V^T = V'^T (C + dI)^-1."""
    if C.shape != (W.shape[1], W.shape[1]) or not torch.isfinite(C).all():
        raise ValueError(f"qpeft: the input covariance of {name} must be finite [{W.shape[1]}, {W.shape[1]}]")
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    damp = 0.01
    for _ in range(MAX_DAMPING_STEPS):
        fixed = C + eye * (C.diagonal().mean() * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < INVERSE_TOLERANCE:
            break
        damp *= 2
    else:
        raise ValueError(f"qpeft: the input covariance of {name} cannot be inverted (damping up to {damp:g})")
    U, S, Vh = torch.linalg.svd(W @ fixed, full_matrices=False)
    return S, U, (Vh @ inverse).T


def _check_eigens(name: str, module: nn.Module, eigens, r: int) -> None:
    S, U, V = eigens
    out_features, in_features = _weight(module).shape
    if S.shape != (r,) or U.shape != (out_features, r) or V.shape != (in_features, r):
        raise ValueError(f"qpeft: the CorDA cache's decomposition of {name} is not of rank {r} for this layer")


def take_eigens(name: str, module: nn.Module, r: int) -> tuple[torch.Tensor, ...]:
    """The decomposition preprocess_corda left on ``module`` (removed from it)."""
    eigens = getattr(module, EIGENS, None)
    if eigens is None:
        raise ValueError(
            f"qpeft: {name} has no CorDA decomposition: run qpeft.preprocess_corda(model, config, run_model) on the "
            "float model before get_peft_model"
        )
    _check_eigens(name, module, eigens, r)
    delattr(module, EIGENS)
    return eigens
