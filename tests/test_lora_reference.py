"""The float64 LoRA-layer reference (the oracle of the fused kernels) computes what the real peft package does:
outputs and every gradient, for LoRA, rsLoRA, DoRA, LoRA bias and dropout (peft's dropout module replaced by
qpeft's mask regenerated from a seed, so both sides drop the same elements)."""

import pytest
import torch
from torch import nn

from qpeft import reference as R

from helpers import SeededDropout

peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")


class Tiny(nn.Module):
    def __init__(self, k, n, bias):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=bias, dtype=torch.float64)

    def forward(self, x):
        return self.proj(x)


CASES = [  # (use_dora, use_rslora, lora_bias, p, base_bias)
    (False, False, False, 0.0, True),
    (False, True, False, 0.3, True),
    (False, False, True, 0.3, False),
    (True, False, False, 0.0, True),
    (True, True, False, 0.3, True),
    (True, False, False, 0.3, False),
]


@pytest.mark.parametrize("use_dora,use_rslora,lora_bias,p,base_bias", CASES)
def test_reference_equals_peft(use_dora, use_rslora, lora_bias, p, base_bias):
    k, n, r, alpha, seed = 48, 40, 8, 16, 1234
    model = Tiny(k, n, base_bias)
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=p,
        target_modules=["proj"],
        use_rslora=use_rslora,
        use_dora=use_dora,
        lora_bias=lora_bias,
    )
    peft_model = peft.get_peft_model(model, config).train()
    layer = peft_model.base_model.model.proj
    layer.lora_dropout["default"] = SeededDropout(p, seed) if p > 0 else nn.Identity()
    with torch.no_grad():  # peft initialises B = 0; make the LoRA branch matter
        layer.lora_B["default"].weight.normal_()
        if lora_bias:
            layer.lora_B["default"].bias.normal_()
        if use_dora:
            layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.1 * torch.rand(n, dtype=torch.float64))
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W, bias = layer.base_layer.weight, layer.base_layer.bias
    magnitude = layer.lora_magnitude_vector["default"].weight if use_dora else None
    lbias = layer.lora_B["default"].bias if lora_bias else None

    x = torch.randn(3, 5, k, dtype=torch.float64, requires_grad=True)
    y_peft = peft_model(x)
    keep = R.dropout_keep_mask(x.shape, p, seed) if p > 0 else None
    x_ref = x.detach().clone().requires_grad_(True)
    params = [t.detach().clone().requires_grad_(True) for t in (A, B)]
    extra = {
        name: t.detach().clone().requires_grad_(True)
        for name, t in (("magnitude", magnitude), ("lora_bias", lbias), ("bias", bias))
        if t is not None
    }
    y_ref = R.lora_linear(
        x_ref, W.detach(), params[0], params[1], R.lora_scaling(r, alpha, use_rslora), keep_mask=keep, p=p, **extra
    )
    torch.testing.assert_close(y_ref, y_peft, rtol=1e-12, atol=1e-12)

    grad = torch.randn_like(y_peft)
    y_peft.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x_ref.grad, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(params[0].grad, A.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(params[1].grad, B.grad, rtol=1e-12, atol=1e-12)
    ours_by_name = {"magnitude": magnitude, "lora_bias": lbias, "bias": bias}
    for name, t in extra.items():
        if ours_by_name[name].requires_grad:
            torch.testing.assert_close(t.grad, ours_by_name[name].grad, rtol=1e-12, atol=1e-12)
