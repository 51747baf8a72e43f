"""AdaLoRA on qpeft's 4-bit layers: SVD-form adapters in LoraLinear4bit (through the fused LoRA path, E folded
into A), the rank allocator, the orthogonality penalty and peft's file keys.

File keys: ``base_model.model.<module>.lora_A`` [r, in], ``.lora_E`` [r, 1], ``.lora_B`` [out, r] (no ``.weight``),
trimmed to the kept ranks when the config has a ``rank_pattern``.
"""

from __future__ import annotations

import torch
from torch import nn

from ...nn.lora import AdaLoraAdapter, LoraLinear4bit
from .. import default_targets, targets
from ..lora.model import PREFIX, bias_parameters, lora_layers
from .config import AdaLoraConfig


def _init_rank(config: AdaLoraConfig, name: str) -> int:
    pattern = (config.rank_pattern or {}).get(f"{name}.lora_E")
    return config.init_r if pattern is None else sum(pattern)


def inject_adapter(model: nn.Module, config: AdaLoraConfig, adapter_name: str, loaded: bool = False) -> list[str]:
    """AdaLoRA adapters of rank init_r (or the rank_pattern's kept ranks) in the targeted layers (quantized; no
    target_modules: peft's LoRA defaults for the model type)."""
    default_targets.fill_lora(model, config)
    names = targets.find_target_modules(model, config)
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLinear4bit):
            module = LoraLinear4bit(targets.quantized(module, config), r=None)
            targets.set_submodule(model, name, module)
        base = module.base
        adapter = AdaLoraAdapter(
            base.in_features,
            base.out_features,
            _init_rank(config, name),
            config.lora_alpha,
            config.lora_dropout,
            ranknum=config.init_r,
            device=base.weight.device,
        )
        if config.init_lora_weights is False:
            with torch.no_grad():
                adapter.lora_E.normal_(0.0, 0.5)
        module.register_adapter(adapter_name, adapter, activate=False)
    config.fan_in_fan_out = any(model.get_submodule(n).base.fan_in_fan_out for n in names)
    return names


def adapters_of(model: nn.Module, adapter_name: str) -> list[tuple[str, AdaLoraAdapter]]:
    return sorted(
        (name, layer.adapters[adapter_name])
        for name, layer in lora_layers(model)
        if adapter_name in layer.adapters and isinstance(layer.adapters[adapter_name], AdaLoraAdapter)
    )


def file_parameters(model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> dict[str, torch.Tensor]:
    """peft key -> tensor: the parameters themselves, or (after allocation, with a rank_pattern) their kept ranks."""
    params: dict[str, torch.Tensor] = {}
    pattern = config.rank_pattern or {}
    for name, a in adapters_of(model, adapter_name):
        key = PREFIX + name
        keep = pattern.get(f"{name}.lora_E")
        if keep is None or len(keep) != a.r or all(keep):
            params.update({key + ".lora_A": a.lora_A, key + ".lora_E": a.lora_E, key + ".lora_B": a.lora_B})
        else:
            index = torch.tensor(keep, device=a.lora_A.device).nonzero().reshape(-1)
            params.update(
                {
                    key + ".lora_A": a.lora_A[index],
                    key + ".lora_E": a.lora_E[index],
                    key + ".lora_B": a.lora_B[:, index],
                }
            )
    params.update(bias_parameters(model, config))
    return params


def orthogonal_penalty(model: nn.Module, adapter_name: str) -> torch.Tensor | None:
    """Mean over every A and B of the adapter of ||P P^T - I||_F (A) / ||P^T P - I||_F (B), as peft adds it."""
    terms = []
    for _, a in adapters_of(model, adapter_name):
        for p, gram in ((a.lora_A, a.lora_A @ a.lora_A.T), (a.lora_B, a.lora_B.T @ a.lora_B)):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.matrix_norm(gram - eye))
    return torch.stack(terms).mean() if terms else None


class RankAllocator:
    """peft's budget schedule and importance-based masking over one adapter's layers.

    The allocator follows peft's RankAllocator: importance |p * grad| of every entry of A, E, B, smoothed (beta1) and
    its uncertainty (beta2); a rank's score is mean_A + mean_B + E of those products; at a masking step the ranks at or
    below the k-th smallest score (k = initial budget - current budget) are masked. peft keeps computing masked ranks
    (their E is zeroed at each mask but gets gradients); qpeft skips them, so a masked rank's fresh importance is 0
    where peft's is |E * dE| after the optimizer moved E off zero."""

    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str):
        self.model, self.config, self.adapter_name = model, config, adapter_name
        layers = adapters_of(model, adapter_name)
        self.init_bgt = sum(a.r for _, a in layers)
        self.target_bgt = config.target_r * len(layers)
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * mul**3 + self.target_bgt), step % c.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for name, a in adapters_of(self.model, self.adapter_name):
            for part in ("lora_A", "lora_B", "lora_E"):
                p = getattr(a, part)
                ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                key = (name, part)
                avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
                unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
                avg = b1 * avg + (1 - b1) * ipt
                self.exp_avg_ipt[key] = avg
                self.exp_avg_unc[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def _scores(self) -> dict[str, torch.Tensor]:
        scores = {}
        for name, a in adapters_of(self.model, self.adapter_name):
            element = {
                part: self.exp_avg_ipt[(name, part)] * self.exp_avg_unc[(name, part)]
                for part in ("lora_A", "lora_B", "lora_E")
            }
            vectors = element["lora_A"].mean(1) + element["lora_B"].mean(0)
            scores[name] = element["lora_E"].reshape(-1) + vectors
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        scores = self._scores()
        k = self.init_bgt - budget
        everything = torch.cat([s for s in scores.values()]) if scores else torch.zeros(0)
        threshold = torch.kthvalue(everything, k).values.item() if 0 < k <= everything.numel() else float("-inf")
        pattern = {}
        for name, a in adapters_of(self.model, self.adapter_name):
            keep = scores[name] > threshold
            a.set_rank_mask(keep)
            pattern[f"{name}.lora_E"] = keep.tolist()
        return pattern

    def update_and_allocate(self, step: int, force_mask: bool = False) -> dict[str, list[bool]] | None:
        if step < self.config.total_step - self.config.tfinal:
            self.update_ipt()
        budget, mask_now = self.budget_schedule(step)
        return self.mask_to_budget(budget) if mask_now or force_mask else None


def mask_using_rank_pattern(model: nn.Module, adapter_name: str, pattern: dict[str, list[bool]]) -> None:
    for name, a in adapters_of(model, adapter_name):
        keep = pattern.get(f"{name}.lora_E")
        if keep is not None and len(keep) == a.r:
            a.set_rank_mask(torch.tensor(keep))


def add_orthogonal_penalty(peft_model, config: AdaLoraConfig, adapter_name: str, outputs):
    """peft's AdaLoRA forward: a loss in the outputs gains orth_reg_weight x the orthogonality penalty."""
    loss = getattr(outputs, "loss", None)
    if isinstance(loss, torch.Tensor):
        penalty = orthogonal_penalty(peft_model.base_model, adapter_name)
        if penalty is not None:
            outputs.loss = loss + config.orth_reg_weight * penalty
    return outputs


def update_and_allocate(peft_model, config: AdaLoraConfig, adapter_name: str, global_step: int) -> None:
    """The rank allocation after the optimizer step of ``global_step`` (peft's
    ``model.base_model.update_and_allocate``): importance from the gradients still held, masks per the budget
    schedule, the final pattern fixed at total_step - tfinal and applied from then on. The allocator lives in
    ``peft_model.method_state``."""
    allocator = peft_model.method_state.get(adapter_name)
    if allocator is None:
        allocator = peft_model.method_state[adapter_name] = RankAllocator(peft_model.base_model, config, adapter_name)
    final = config.total_step - config.tfinal
    if global_step < final:
        pattern = allocator.update_and_allocate(global_step)
        if pattern:
            config.rank_pattern = pattern
    elif global_step == final:
        config.rank_pattern = allocator.update_and_allocate(global_step, force_mask=True)
        allocator.reset_ipt()
    elif config.rank_pattern:
        mask_using_rank_pattern(peft_model.base_model, adapter_name, config.rank_pattern)
