"""EVA (explained variance adaptation), peft's ``init_lora_weights="eva"``: each LoRA layer's A starts as the top
right-singular vectors of the layer's inputs over data batches (an incremental PCA per layer, run until the
components stop moving: cosine similarity >= ``tau``), with the rank budget (the sum of the layers' ranks)
redistributed to the layers whose components explain the most variance (at most r * ``rho`` each); B starts at 0,
so the model's output is unchanged. On qpeft's 4-bit base the inputs are those the 4-bit model computes.

peft's API: ``get_eva_state_dict`` (layer name -> A rows) and ``initialize_lora_eva_weights`` (computes it if not
given, then sets the adapters, their ranks, rank_pattern / alpha_pattern and target_modules). Layers that receive
the same input (q, k and v projections) share one decomposition, found by comparing their first inputs, as peft
does. The PCA's randomized SVD (q = 2k, 4 subspace iterations) draws from a generator seeded 42 in a forked RNG,
as peft's, so both give the same components on the same inputs.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ...nn.lora import LoraLinear4bit
from .. import targets
from .config import EvaConfig, LoraConfig

SVD_SEED = 42
SUBSPACE_ITERATIONS = 4
DEFAULT_MAX_STEPS = 1000  # batches before giving up on convergence (peft cycles the data without end)


# ---- one layer's incremental PCA -----------------------------------------------------------------------------
class InputPCA:
    """The k leading principal components of a stream of row batches [n, d] (the merge of each new batch into the
    kept components is the incremental PCA of Ross et al., as scikit-learn's IncrementalPCA computes it):
    ``components`` [k, d] (sign: the largest entry of each positive), ``singular_values`` [k],
    ``explained_variance_ratio`` [k], and ``converged`` [k]: each component's cosine similarity with its value
    before the last batch is >= ``tau``."""

    def __init__(self, k: int, tau: float):
        self.k, self.tau = k, tau
        self.count = 0
        self.mean = self.var = None  # fp64 [d]
        self.components = self.singular_values = self.explained_variance_ratio = None
        self.converged = torch.zeros(k, dtype=torch.bool)

    def update(self, X: torch.Tensor) -> None:
        n, d = X.shape
        if n < self.k:  # too few rows for k components: this batch is left out (as peft)
            return
        if self.k > d:
            raise ValueError(f"qpeft: EVA asks {self.k} components of inputs of width {d}")
        X = X.float().clone()
        batch_mean = X.sum(0, dtype=torch.float64) / n
        batch_var = (X.double() - batch_mean).square().mean(0)
        total = self.count + n
        if self.count == 0:
            mean, var = batch_mean, batch_var
            X -= batch_mean
        else:  # pooled mean and variance of the rows seen before and this batch
            delta = batch_mean - self.mean
            mean = self.mean + delta * (n / total)
            var = (self.var * self.count + batch_var * n + delta.square() * (self.count * n / total)) / total
            batch_mean32 = X.mean(0)
            X -= batch_mean32
            correction = ((self.count / total) * n) ** 0.5 * (self.mean - batch_mean32.double())
            X = torch.vstack((self.singular_values[:, None] * self.components, X, correction[None, :]))
        U, S, Vh = _randomized_svd(X, 2 * self.k)
        Vh = Vh * _signs(Vh)[:, None]
        previous = self.components
        self.count, self.mean, self.var = total, mean, var
        self.components, self.singular_values = Vh[: self.k], S[: self.k]
        self.explained_variance_ratio = S[: self.k].square() / (var * total).sum()
        if previous is not None:
            similarity = nn.functional.cosine_similarity(self.components, previous.to(self.components.dtype))
            self.converged = similarity >= self.tau


def _randomized_svd(X: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.random.fork_rng(devices=[X.device] if X.device.type == "cuda" else []):
        torch.manual_seed(SVD_SEED)
        U, S, V = torch.svd_lowrank(X, q=min(q, *X.shape), niter=SUBSPACE_ITERATIONS)
    return U, S, V.mH


def _signs(Vh: torch.Tensor) -> torch.Tensor:
    """+-1 per row of Vh: the sign of its entry of largest magnitude (a deterministic choice among +-v)."""
    return torch.sign(Vh.gather(1, Vh.abs().argmax(1, keepdim=True)).squeeze(1))


# ---- inputs of the layers --------------------------------------------------------------------------------------
def forward_fn_dict(model, inputs):
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input, peft_config: LoraConfig):
    """The (batch, position) indices of the tokens the decomposition uses: attended, and (use_label_mask) not
    labelled ``label_mask_value``."""
    if not isinstance(model_input, Mapping):
        raise TypeError("qpeft: EVA's default input preparation needs dict batches (input_ids, attention_mask, ...)")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    eva = peft_config.eva_config
    if eva.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != eva.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name) -> torch.Tensor:
    """The rows [tokens, in] of a layer's input [batch, seq, in] at the indices from the model inputs."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"qpeft: layer {layer_name} got a {type(x).__name__} input; pass prepare_layer_inputs_fn")
    return x[model_input.T.unbind()]


class _Inputs:
    """A forward hook keeping what ``prepare(input, model_input, name)`` makes of a layer's input: passed to
    ``sink`` (the PCA's update or a recorder)."""

    def __init__(self, name: str, prepare: Callable, sink: Callable):
        self.name, self.prepare, self.sink = name, prepare, sink
        self.model_input = None

    @torch.no_grad()
    def __call__(self, module, args, output):
        x = self.prepare(args, self.model_input, self.name)
        if x.ndim != 2:
            x = x.reshape(-1, x.shape[-1])
        self.sink(x.float())


def _device(model: nn.Module) -> torch.device | None:
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    return devices.pop() if len(devices) == 1 else None


def _to(inputs, device):
    if device is None:
        return inputs
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs


# ---- the decomposition ---------------------------------------------------------------------------------------
@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: LoraConfig | None = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | Mapping[str, Callable] | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = False,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> dict[str, torch.Tensor]:
    """peft's get_eva_state_dict: layer name -> its EVA A rows [rank, in] (rank redistributed). ``model``: a
    QPeftModel (its LoRA layers, adapters disabled while the data runs) or a model plus ``peft_config`` (its
    targeted linear layers). ``max_steps``: batches after which layers still moving keep their current components
    (with a warning) instead of cycling the data on."""
    del show_progress_bar  # (no progress bar: accepted for peft's signature)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and gather_distributed_inputs:
        raise NotImplementedError(
            "qpeft: EVA does not gather layer inputs across ranks; pass gather_distributed_inputs=False (each rank "
            "decomposes its own batches) or initialise on one process"
        )
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"qpeft: max_steps must be a positive integer, got {max_steps!r}")
    is_peft = hasattr(model, "peft_config") and hasattr(model, "lora_layers")
    if peft_config is None:
        if not is_peft:
            raise ValueError("qpeft: peft_config is required when the model is not a QPeftModel")
        peft_config = model.peft_config[adapter_name]
    if peft_config.eva_config is None:
        peft_config = copy.copy(peft_config)
        peft_config.eva_config = EvaConfig()
    if is_peft:
        layers = {n: m for n, m in model.lora_layers() if adapter_name in m.adapters}
        context, root = model.disable_adapter(), model.get_base_model()
    else:
        layers = {n: model.get_submodule(n) for n in targets.find_target_modules(model, peft_config)}
        context, root = contextlib.nullcontext(), model
    if not layers:
        raise ValueError("qpeft: EVA found no LoRA layer to initialise")
    try:
        first = next(iter(dataloader))
    except StopIteration:
        raise ValueError("qpeft: the dataloader is empty") from None
    eva = peft_config.eva_config
    ranks = {n: targets.pattern_value(n, peft_config.rank_pattern, peft_config.r, "rank_pattern") for n in layers}
    rho = eva.rho
    if rho > 1000:  # (peft's cap: no layer can take more rows than its largest dimension)
        rho = min(rho, max(max(p.shape) for p in root.parameters()) // peft_config.r)
    most = {n: round(r * rho) for n, r in ranks.items()}
    budget = sum(ranks.values())
    device = _device(root)
    prepare_model = prepare_model_inputs_fn or (lambda inputs, config: copy.deepcopy(inputs))

    def prepare_for(name):
        if isinstance(prepare_layer_inputs_fn, Mapping):
            return prepare_layer_inputs_fn.get(name, prepare_layer_inputs_fn_language_modeling)
        return prepare_layer_inputs_fn or prepare_layer_inputs_fn_language_modeling

    if isinstance(prepare_layer_inputs_fn, Mapping) and set(prepare_layer_inputs_fn) - set(layers):
        raise ValueError(
            f"qpeft: prepare_layer_inputs_fn names no layer: {sorted(set(prepare_layer_inputs_fn) - set(layers))}"
        )
    was_training = root.training
    root.eval()
    handles = []
    try:
        with context:
            # layers fed the same input (q, k, v) share one decomposition: the first batch tells which
            first_inputs: dict[str, torch.Tensor] = {}
            batch = _to(first, device)
            hooks = {n: _Inputs(n, prepare_for(n), lambda x, n=n: first_inputs.setdefault(n, x)) for n in layers}
            for name, hook in hooks.items():
                hook.model_input = prepare_model(batch, peft_config)
                handles.append(layers[name].register_forward_hook(hook))
            forward_fn(root, batch)
            for h in handles:
                h.remove()
            handles.clear()
            missing = set(layers) - set(first_inputs)
            if missing:
                raise ValueError(f"qpeft: the first batch never reached the layers {sorted(missing)}")
            owner: dict[str, str] = {}
            for name in layers:
                twin = next((o for o in owner.values() if torch.equal(first_inputs[o], first_inputs[name])), None)
                owner[name] = twin or name
            for name, o in owner.items():
                most[o] = max(most[o], most[name])
            for name, o in owner.items():
                most[name] = most[o]
            first_inputs.clear()
            pcas = {o: InputPCA(most[o], eva.tau) for o in set(owner.values())}
            hooks = {o: _Inputs(o, prepare_for(o), pcas[o].update) for o in pcas}
            attached = {o: layers[o].register_forward_hook(hooks[o]) for o in pcas}
            allotted = dict(most)
            steps = 0
            for batch in itertools.cycle(dataloader):
                batch = _to(batch, device)
                model_input = prepare_model(batch, peft_config)
                for o, hook in hooks.items():  # a layer done with its allotted rank stops (and restarts if it grows)
                    done = bool(pcas[o].converged[: allotted[o]].all())
                    if done and o in attached:
                        attached.pop(o).remove()
                    elif not done and o not in attached:
                        attached[o] = layers[o].register_forward_hook(hook)
                    hook.model_input = model_input
                if not attached or steps >= max_steps:
                    break
                forward_fn(root, batch)
                steps += 1
                if all(p.components is not None for p in pcas.values()):
                    allotted = _allot(pcas, owner, most, budget)
            for h in attached.values():
                h.remove()
            if attached:
                warnings.warn(
                    f"qpeft: EVA stopped after {max_steps} batches with layers still moving: {sorted(attached)}; "
                    "they keep their current components",
                    stacklevel=2,
                )
    finally:
        for h in handles:
            h.remove()
        root.train(was_training)
    if any(p.components is None for p in pcas.values()):
        short = sorted(o for o, p in pcas.items() if p.components is None)
        raise ValueError(f"qpeft: no batch gave the layers {short} as many tokens as their rank (r * rho)")
    state = {}
    for name in layers:
        pca = pcas[owner[name]]
        u = pca.components[: allotted[name]].clone()
        if eva.whiten:
            u /= pca.singular_values[: allotted[name]].sqrt()[:, None]
        state[name] = u.float()
    return state


def _allot(pcas: dict, owner: dict, most: dict, budget: int) -> dict[str, int]:
    """The rank budget given to the components of highest explained-variance ratio over all layers (each layer
    offering its first ``most`` components; layers sharing a decomposition each offer them; ties broken as peft
    breaks them: owners first, then the sharing layers, one descending argsort). Within a shared decomposition the
    owner holds the largest rank (its convergence is the one checked)."""
    order = [n for n in owner if owner[n] == n] + [n for n in owner if owner[n] != n]
    names = [n for n in order for _ in range(min(most[n], len(pcas[owner[n]].explained_variance_ratio)))]
    ratios = torch.cat([pcas[owner[n]].explained_variance_ratio[: most[n]] for n in order])
    counts = collections.Counter(names[i] for i in ratios.argsort(descending=True)[:budget].tolist())
    allotted = {name: counts.get(name, 0) for name in owner}
    for name, o in owner.items():
        if name != o and allotted[name] > allotted[o]:
            allotted[name], allotted[o] = allotted[o], allotted[name]
    return allotted


# ---- setting the adapters --------------------------------------------------------------------------------------
@torch.no_grad()
def initialize_lora_eva_weights(
    model, dataloader: Iterable | None = None, eva_state_dict: dict | None = None, adapter_name: str = "default", **data
):
    """peft's initialize_lora_eva_weights: the EVA start of adapter ``adapter_name`` of the QPeftModel ``model``
    (from ``eva_state_dict``, else computed from ``dataloader`` with ``data``, get_eva_state_dict's keyword
    options: forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn, max_steps, ...): A = the layer's
    components, B = 0, each layer's rank as redistributed (a layer given rank 0 loses the adapter), alpha scaled
    with it when ``adjust_scaling_factors``; the config's target_modules, rank_pattern and alpha_pattern record
    it."""
    if not hasattr(model, "peft_config") or adapter_name not in model.peft_config:
        raise ValueError(f"qpeft: initialize_lora_eva_weights needs a QPeftModel with adapter {adapter_name!r}")
    config = model.peft_config[adapter_name]
    if config.init_lora_weights != "eva":
        raise ValueError("qpeft: initialize_lora_eva_weights needs an adapter with init_lora_weights='eva'")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("qpeft: pass a dataloader or an eva_state_dict")
        eva_state_dict = get_eva_state_dict(model, dataloader, adapter_name=adapter_name, **data)
    layers = {n: m for n, m in model.lora_layers() if adapter_name in m.adapters}
    unknown = set(eva_state_dict) - set(layers)
    if unknown:
        raise KeyError(f"qpeft: the EVA state dict names layers without adapter {adapter_name!r}: {sorted(unknown)}")
    for name, w in eva_state_dict.items():
        layer = layers[name]
        if w.ndim != 2 or w.shape[1] != layer.in_features or not torch.isfinite(w).all():
            raise ValueError(f"qpeft: the EVA rows of {name} must be finite [rank, {layer.in_features}]")
    root = model.get_base_model()
    rank_pattern, alpha_pattern, kept = {}, {}, []
    missing = sorted(set(layers) - set(eva_state_dict))
    for name, layer in layers.items():
        old = layer.adapters[adapter_name]
        r, alpha = old.r, old.alpha
        if name in eva_state_dict:
            w = eva_state_dict[name]
            new_r = w.shape[0]
            if new_r == 0:
                _drop_adapter(root, name, layer, adapter_name)
                continue
            if new_r != r and config.eva_config.adjust_scaling_factors:
                alpha = alpha * new_r / r
            if new_r != r:
                _resize(layer, adapter_name, old, new_r, alpha)
            adapter = layer.adapters[adapter_name]
            adapter.lora_A.copy_(w)
            adapter.lora_B.zero_()
            r = new_r
        kept.append(name)
        if r != config.r:
            rank_pattern[name] = r
        if alpha != config.lora_alpha:
            alpha_pattern[name] = alpha
    config.target_modules, config.rank_pattern, config.alpha_pattern = kept, rank_pattern, alpha_pattern
    model.set_adapter(model.active_adapter)  # the new tensors train as the old ones did
    if missing:
        warnings.warn(f"qpeft: EVA had no rows for {missing}; they keep their initial adapters", stacklevel=2)
    return model


def _resize(layer: LoraLinear4bit, name: str, old, r: int, alpha: float) -> None:
    """Adapter ``name`` of ``layer`` replaced by one of rank ``r`` (its other settings kept, its activity kept)."""
    active = list(layer.active_adapters)
    layer.delete_adapter(name)
    layer.add_adapter(name, activate=False, **dataclasses.asdict(dataclasses.replace(old.spec, r=r, alpha=alpha)))
    layer.set_adapter(active)


def _drop_adapter(root: nn.Module, path: str, layer: LoraLinear4bit, name: str) -> None:
    """Rank 0: the adapter leaves the layer; a layer left with none becomes its 4-bit base again."""
    layer.delete_adapter(name)
    if not layer.adapters:
        targets.set_submodule(root, path, layer.base)
