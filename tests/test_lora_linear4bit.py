"""qpeft.nn.LoraLinear4bit against the float64 reference (which equals peft): outputs, all gradients, saved
memory for backward, dropout regenerated from its seed."""

import pytest
import torch

from qpeft import functional as F
from qpeft import reference as R
from qpeft.nn import Linear4bit, LoraLinear4bit

from helpers import rel_err

CONFIGS = [  # (use_dora, use_rslora, lora_bias, p, base_bias)
    (False, False, False, 0.0, True),
    (False, True, True, 0.2, True),
    (True, False, False, 0.0, False),
    (True, True, False, 0.2, True),
]


def make_layer(k, n, device, dtype, use_dora=False, use_rslora=False, lora_bias=False, p=0.0, base_bias=True, r=8):
    dense = torch.nn.Linear(k, n, bias=base_bias, device=device, dtype=dtype)
    layer = LoraLinear4bit.from_linear(
        dense, r=r, alpha=16, dropout=p, use_rslora=use_rslora, use_dora=use_dora, lora_bias=lora_bias
    ).train()
    with torch.no_grad():  # B starts at 0: make the branch matter
        layer.lora_B.normal_(0, 0.1)
        if layer.lora_bias is not None:
            layer.lora_bias.normal_()
        if layer.lora_magnitude is not None:
            layer.lora_magnitude.mul_(1 + 0.1 * torch.rand_like(layer.lora_magnitude))
    return layer


@pytest.mark.parametrize("use_dora,use_rslora,lora_bias,p,base_bias", CONFIGS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("lead", [(3, 7), (1, 3)])  # 21 rows: slab-wise / dequantize + GEMM; 3: the small-M kernels
def test_forward_and_gradients_match_reference(device, use_dora, use_rslora, lora_bias, p, base_bias, dtype, tol, lead):
    k, n, seed = 96, 72, int(torch.randint(0, 2**31, ()))
    layer = make_layer(k, n, device, dtype, use_dora, use_rslora, lora_bias, p, base_bias)
    x = torch.randn(*lead, k, dtype=dtype, device=device, requires_grad=True)
    y = layer(x, dropout_seed=seed)
    grad = torch.randn_like(y)
    y.backward(grad)

    def leaf(t):
        return None if t is None else t.detach().double().requires_grad_(True)

    x_ref, A_ref, B_ref = leaf(x), leaf(layer.lora_A), leaf(layer.lora_B)
    m_ref, lb_ref = leaf(layer.lora_magnitude), leaf(layer.lora_bias)
    W = layer.base.dequantized_weight(torch.float32).double()
    bias = layer.base.bias.detach().double() if base_bias else None
    keep = R.dropout_keep_mask(x.shape, p, seed) if p > 0 else None
    y_ref = R.lora_linear(
        x_ref, W, A_ref, B_ref, layer.scaling, bias=bias, keep_mask=keep, p=p, magnitude=m_ref, lora_bias=lb_ref
    )
    y_ref.backward(grad.double())
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert rel_err(y, y_ref) < tol
    assert rel_err(x.grad, x_ref.grad) < tol
    assert rel_err(layer.lora_A.grad, A_ref.grad) < tol
    assert rel_err(layer.lora_B.grad, B_ref.grad) < tol
    if lora_bias:
        assert rel_err(layer.lora_bias.grad, lb_ref.grad) < tol
    if use_dora:
        assert rel_err(layer.lora_magnitude.grad, m_ref.grad) < tol
    assert layer.base.weight.grad is None and (layer.base.bias is None or layer.base.bias.grad is None)


def saved_bytes_beyond(layer, x, **kw):
    """Bytes of tensors saved for backward whose storage is not the input's or a parameter's / buffer's."""
    known = {t.untyped_storage().data_ptr() for t in list(layer.parameters()) + list(layer.buffers()) + [x]}
    extra = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known:
            extra[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x, **kw)
    return sum(extra.values()), y


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_backward_keeps_only_x_and_xa(device, p):
    m, k, n, r = 256, 512, 384, 16
    layer = make_layer(k, n, device, torch.bfloat16, p=p, r=r)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=device, requires_grad=True)
    extra, y = saved_bytes_beyond(layer, x, dropout_seed=3)
    assert extra <= m * r * 2 + 64, f"backward keeps {extra} bytes besides x; x A^T is {m * r * 2}"
    y.sum().backward()  # and the saved state suffices


def test_dropout_is_deterministic_per_seed_and_off_in_eval(device):
    layer = make_layer(64, 32, device, torch.float32, p=0.5)
    x = torch.randn(4, 64, device=device)
    assert torch.equal(layer(x, dropout_seed=1), layer(x, dropout_seed=1))
    assert not torch.equal(layer(x, dropout_seed=1), layer(x, dropout_seed=2))
    layer.eval()
    y_eval = layer(x)
    layer.dropout = 0.0
    layer.train()
    assert torch.equal(y_eval, layer(x))


def test_bad_arguments():
    dense = torch.nn.Linear(16, 8)
    with pytest.raises(ValueError, match="rank"):
        LoraLinear4bit.from_linear(dense, r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraLinear4bit.from_linear(dense, dropout=1.0)
    with pytest.raises(ValueError, match="init"):
        LoraLinear4bit.from_linear(dense, init="orthogonal")
    with pytest.raises(ValueError, match="last dimension 16"):
        LoraLinear4bit.from_linear(dense)(torch.randn(2, 15))


@pytest.mark.parametrize(
    "p,use_dora,explicit_seed", [(0.0, False, True), (0.1, False, True), (0.1, False, False), (0.1, True, False)]
)
def test_torch_compile_fullgraph_forward_and_backward(p, use_dora, explicit_seed):
    """No graph break, also with the default seed (drawn on the device as a tensor, never read on the host)."""
    torch._dynamo.reset()
    layer = make_layer(64, 32, "cpu", torch.float32, p=p, use_dora=use_dora)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x1 = torch.randn(6, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    kw = {"dropout_seed": 11} if explicit_seed else {}
    torch.manual_seed(4)
    y1 = compiled(x1, **kw)
    torch.manual_seed(4)
    y2 = layer(x2, **kw)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    if not explicit_seed:  # a fresh seed per call
        assert not torch.equal(compiled(x1), y1)
    grads1 = torch.autograd.grad(y1.sum(), (x1, layer.lora_A, layer.lora_B))
    grads2 = torch.autograd.grad(y2.sum(), (x2, layer.lora_A, layer.lora_B))
    for a, b in zip(grads1, grads2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("explicit_seed", [True, False])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing(device, use_reentrant, explicit_seed):
    """The recomputed forward must drop the same elements: with an explicit seed trivially, with the default
    per-call seed because it is drawn from torch's generator (on CUDA: computed from its state on the host),
    whose state checkpointing restores."""
    from torch.utils.checkpoint import checkpoint

    layer = make_layer(64, 48, device, torch.float32, p=0.2)

    seed_kw = {"dropout_seed": 9} if explicit_seed else {}

    def grads(run):
        layer.zero_grad()
        torch.manual_seed(5)
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_(True)
        y = run(x)
        y.sum().backward()
        return y.detach(), [x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]

    y_plain, g_plain = grads(lambda t: layer(t, **seed_kw))
    y_ckpt, g_ckpt = grads(lambda t: checkpoint(lambda u: layer(u, **seed_kw), t, use_reentrant=use_reentrant))
    assert torch.equal(y_ckpt, y_plain)  # the recomputation regenerates the same dropout mask
    for a, b in zip(g_ckpt, g_plain):
        torch.testing.assert_close(a, b)


def test_autocast_bf16():
    layer = make_layer(64, 32, "cpu", torch.float32)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.to(torch.bfloat16))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.lora_A.grad.dtype == torch.float32
    assert rel_err(y, layer(x)) < 3e-2


@pytest.mark.parametrize("use_dora,lora_bias", [(False, False), (False, True), (True, False), (True, True)])
def test_merge_unmerge_and_export(use_dora, lora_bias):
    layer = make_layer(80, 40, "cpu", torch.float32, use_dora=use_dora, lora_bias=lora_bias).eval()
    x = torch.randn(6, 80)
    with torch.no_grad():
        y = layer(x)
        layer.merge(torch.float32)
        y_merged = layer(x)
        layer.unmerge()
        y_back = layer(x)
        linear = layer.to_linear(torch.float32)
        y_linear = linear(x)
    assert rel_err(y_merged, y) < 1e-5 and rel_err(y_linear, y) < 1e-5
    assert torch.equal(y_back, y)
    # the merged weight is exact against the float64 definition (no 4-bit requantization loss)
    W = layer.base.dequantized_weight(torch.float32).double()
    merged = W + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
    if use_dora:
        merged = merged * (layer.lora_magnitude.double() / merged.norm(dim=1))[:, None]
    assert rel_err(linear.weight, merged) < 1e-6


def test_disable_adapter_while_merged_is_the_base():
    """disable_adapter() on a merged layer gives the frozen base (as peft, which unmerges), and the merge is still
    there after the context."""
    layer = make_layer(64, 24, "cpu", torch.float32).eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        y_base = layer.base(x)
        layer.merge(torch.float32)
        y_merged = layer(x)
        with layer.disable_adapter():
            assert torch.equal(layer(x), y_base)
        assert layer.merged and torch.equal(layer(x), y_merged)
        assert rel_err(y_merged, y_base) > 1e-3  # the adapter matters


def test_merged_layer_refuses_training():
    layer = make_layer(32, 16, "cpu", torch.float32)
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.train()(torch.randn(2, 32))


def test_dora_backward_keeps_no_m_by_n_activation():
    m, k, n, r = 256, 128, 384, 8
    for p in (0.0, 0.1):
        layer = make_layer(k, n, "cpu", torch.float32, use_dora=True, p=p, r=r)
        x = torch.randn(m, k, requires_grad=True)
        extra, y = saved_bytes_beyond(layer, x, dropout_seed=3)
        allowed = m * r * 4 + 2 * n * 4 + 64  # x A^T, the [N] ratio and row norms (for dm), the seed
        assert extra <= allowed, f"DoRA backward keeps {extra} bytes besides x (allowed {allowed})"
        y.sum().backward()


def test_multiple_adapters_and_disable_match_peft():
    """Two active adapters (summed, each with its own dropout stream) equal peft with the same weights; the
    disabled mode is the base alone."""
    peft = pytest.importorskip("peft")
    from helpers import SeededDropout

    k, n, seed, p = 48, 40, 99, 0.25
    layer = make_layer(k, n, "cpu", torch.float32, p=p, lora_bias=True, r=4)
    second = layer.add_adapter("second", r=6, alpha=3, dropout=p, use_rslora=True)
    with torch.no_grad():
        second.lora_B.normal_(0, 0.1)
    layer.set_adapter(["default", "second"])

    dense = torch.nn.Linear(k, n, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(layer.base.dequantized_weight(torch.float32).double())
        dense.bias.copy_(layer.base.bias.double())
    model = torch.nn.Sequential(dense)
    pm = peft.get_peft_model(
        model,
        peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=p, target_modules=["0"], lora_bias=True),
        adapter_name="default",
    )
    pm.add_adapter("second", peft.LoraConfig(r=6, lora_alpha=3, lora_dropout=p, target_modules=["0"], use_rslora=True))
    pm.base_model.set_adapter(["default", "second"])
    pm.train()
    pl = pm.base_model.model[0]
    for i, name in enumerate(("default", "second")):
        a = layer.adapters[name]
        pl.lora_dropout[name] = SeededDropout(p, seed + i)
        with torch.no_grad():
            pl.lora_A[name].weight.copy_(a.lora_A.double())
            pl.lora_B[name].weight.copy_(a.lora_B.double())
            if a.lora_bias is not None:
                pl.lora_B[name].bias.copy_(a.lora_bias.double())
    x = torch.randn(3, 5, k)
    y = layer(x, dropout_seed=seed)
    y_peft = pm(x.double())
    assert rel_err(y, y_peft) < 2e-5
    grad = torch.randn_like(y)
    y.backward(grad)
    y_peft.backward(grad.double())
    for name in ("default", "second"):
        assert rel_err(layer.adapters[name].lora_A.grad, pl.lora_A[name].weight.grad) < 2e-5
        assert rel_err(layer.adapters[name].lora_B.grad, pl.lora_B[name].weight.grad) < 2e-5

    with torch.no_grad(), layer.disable_adapter():
        y_base = layer(x)
        with pm.disable_adapter():
            assert rel_err(y_base, pm(x.double())) < 1e-6
    assert rel_err(y_base, x.double() @ dense.weight.T + dense.bias) < 1e-6
    assert not layer.disable_adapters

    layer.eval()
    with torch.no_grad():  # merging both adapters gives the same layer
        y_eval = layer(x)
        layer.merge(torch.float32)
        assert rel_err(layer(x), y_eval) < 1e-5
        layer.unmerge()


def test_adapter_management_errors():
    layer = make_layer(16, 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("default")
    with pytest.raises(KeyError, match="no adapter named 'x'"):
        layer.set_adapter("x")
    layer.add_adapter("dora", use_dora=True, activate=False)
    layer.set_adapter(["default", "dora"])
    with pytest.raises(NotImplementedError, match="DoRA"):
        layer(torch.randn(2, 16))
    with pytest.raises(RuntimeError, match="2 active adapters"):
        layer.lora_A
    layer.delete_adapter("dora")
    assert layer.active_adapters == ["default"] and layer.lora_A.shape == (8, 16)
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.add_adapter("late")


@pytest.mark.cuda
def test_cuda_graph_capture_draws_fresh_dropout_per_replay():
    """The default seed is drawn on the device inside the graph and read by the kernels, so each replay of a
    captured forward drops different elements (a host-side seed would be frozen into the graph)."""
    layer = make_layer(128, 64, "cuda", torch.bfloat16, p=0.5)
    x = torch.randn(32, 128, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):  # warm-up outside the graph
            layer(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        y = layer(x)
    graph.replay()
    first = y.clone()
    graph.replay()
    assert torch.isfinite(first).all() and not torch.equal(first, y)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [4, 300])  # the fused decode forward and the GEMM path
def test_cuda_make_graphed_callables_training_step(m):
    """A training step captured with torch.cuda.make_graphed_callables (how a user removes the host's launch
    overhead) equals the eager layer without dropout — output, input and adapter gradients — and with dropout
    each replay draws a new mask (the seed is drawn on the device inside the captured graph)."""
    layer = make_layer(256, 96, "cuda", torch.bfloat16)
    x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, 96, device="cuda", dtype=torch.bfloat16)
    y_eager = layer(x)
    y_eager.backward(dy)
    eager = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    graphed = torch.cuda.make_graphed_callables(layer, (x,))
    y = graphed(x)
    y.backward(dy)
    torch.testing.assert_close(y, y_eager)
    for got, want in zip((x.grad, layer.lora_A.grad, layer.lora_B.grad), eager):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-3)

    dropped = make_layer(256, 96, "cuda", torch.bfloat16, p=0.5)
    graphed = torch.cuda.make_graphed_callables(dropped, (x,))
    first = graphed(x)
    first.backward(dy)
    first, grad_a = first.detach().clone(), dropped.lora_A.grad.clone()
    second = graphed(x)
    second.backward(dy)
    assert torch.isfinite(first).all() and torch.isfinite(grad_a).all() and not torch.equal(first, second)


@pytest.mark.cuda
def test_cuda_default_seed_comes_from_the_generator_state():
    """Eager CUDA calls get their seed without a draw kernel: a CPU tensor computed from the CUDA generator's
    (seed, offset), whose offset advances by 4 per draw; torch.manual_seed reproduces the sequence; a layer
    forward launches no random kernel; under graph capture the seed is drawn on the device instead."""
    from torch.profiler import ProfilerActivity, profile

    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    torch.manual_seed(123)
    before = generator.get_offset()
    first, second = F.draw_dropout_seed("cuda"), F.draw_dropout_seed("cuda")
    assert first.device.type == "cpu" and first.dtype == torch.int64 and first.shape == (1,)
    assert generator.get_offset() == before + 8 and not torch.equal(first, second)
    torch.manual_seed(123)
    assert torch.equal(F.draw_dropout_seed("cuda"), first)
    torch.manual_seed(124)
    assert not torch.equal(F.draw_dropout_seed("cuda"), first)

    layer = make_layer(128, 64, "cuda", torch.bfloat16, p=0.3)
    x = torch.randn(32, 128, device="cuda", dtype=torch.bfloat16)
    layer(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        layer(x)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert not any("distribution" in k or "random" in k for k in kernels), kernels

    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream):
        F.draw_dropout_seed("cuda")  # warm-up on the side stream
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        captured = F.draw_dropout_seed("cuda")
    assert captured.device.type == "cuda"


@pytest.mark.parametrize("r", [4, 20])  # 20 rows of A: above the small-M switch, so W A^T takes the other path
def test_dora_weight_norm_without_a_dense_weight(device, r):
    """DoRA's ||W + s B A||_row, built from the cached row norms of W, W A^T and A A^T, equals the direct norm
    (float64) of the dense weight; and the cache follows a replaced weight."""
    layer = make_layer(160, 48, device, torch.float32, use_dora=True, r=r)
    adapter = layer.adapters["default"]
    W = layer.base.dequantized_weight(torch.float32).double()
    direct = (W + adapter.scaling * adapter.lora_B.double() @ adapter.lora_A.double()).norm(dim=1)
    assert rel_err(layer._dora_norm(adapter), direct) < 1e-6
    other = Linear4bit.from_linear(torch.nn.Linear(160, 48, device=device))
    layer.base.set_quantized_weight(other.quantized_weight)
    W = layer.base.dequantized_weight(torch.float32).double()
    direct = (W + adapter.scaling * adapter.lora_B.double() @ adapter.lora_A.double()).norm(dim=1)
    assert rel_err(layer._dora_norm(adapter), direct) < 1e-6


def test_dora_on_a_zero_weight_row_is_finite_and_matches_the_reference():
    """A row of W that is all zero (pruned weights, padded vocabularies): DoRA's m / ||W + s B A|| would be 0 / 0;
    the row then computes what the base computes, and m gets a finite gradient, as in reference.lora_linear."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 8)
    with torch.no_grad():
        linear.weight[3].zero_()
    layer = LoraLinear4bit.from_linear(linear, r=2, use_dora=True)
    x = torch.randn(5, 64, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    a = layer.adapters["default"]
    W = layer.base.dequantized_weight(torch.float32)
    x64 = x.detach().double().requires_grad_()
    m64 = a.lora_magnitude.detach().double().requires_grad_()
    ref = R.lora_linear(
        x64, W, a.lora_A.detach(), a.lora_B.detach(), a.scaling, bias=layer.base.bias.detach(), magnitude=m64
    )
    ref.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(a.lora_magnitude.grad).all()
    assert rel_err(y, ref) < 1e-5 and rel_err(a.lora_magnitude.grad, m64.grad) < 1e-4
    assert torch.equal(y[:, 3], layer.base.bias[3].expand(5))
    layer.eval().merge()
    assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("how", ["fused", "dora", "two_adapters", "small_m"])
def test_fp16_branch_stays_finite_where_x_at_exceeds_fp16(how):
    """x A^T = 76800 per rank (above fp16's 65504) while the layer's output is a few hundred: the LoRA branch runs
    in fp32 for fp16 inputs (peft's is fp32 too), so output and gradients are finite and match the float64
    reference."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 8).half()
    layer = LoraLinear4bit.from_linear(linear, r=4, use_dora=how == "dora")
    a = layer.adapters["default"]
    with torch.no_grad():
        a.lora_A.fill_(1.0)
        a.lora_B.fill_(1e-3)
    if how == "two_adapters":
        layer.add_adapter("other", r=2)
        layer.set_adapter(["default", "other"])
    rows = 2 if how == "small_m" else 40
    x = torch.full((rows, 256), 300.0, dtype=torch.float16, requires_grad=True)
    y = layer(x)
    y.float().square().sum().backward()
    W = layer.base.dequantized_weight(torch.float32)
    x64 = x.detach().double().requires_grad_()
    ref = R.lora_linear(
        x64,
        W,
        a.lora_A.detach(),
        a.lora_B.detach(),
        a.scaling,
        bias=layer.base.bias.detach(),
        magnitude=a.lora_magnitude.detach() if how == "dora" else None,
    )
    ref.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(a.lora_B.grad).all()
    assert rel_err(y, ref) < 2e-3 and rel_err(x.grad, x64.grad) < 2e-2
