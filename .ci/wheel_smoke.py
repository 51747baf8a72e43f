"""Smoke test of an installed qpeft wheel, run from outside the source tree in a fresh virtual environment
(.ci/run): the wheel's contents, import from site-packages, the torch pin, quantize / dequantize against the
reference, a LoraLinear4bit training step, `qpeft info` and a few steps of `qpeft demo`.
    python wheel_smoke.py <the .whl file>"""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

wheel = Path(sys.argv[1])
names = zipfile.ZipFile(wheel).namelist()
allowed = ("qpeft/", "qpeft-")
assert all(n.startswith(allowed) for n in names), [n for n in names if not n.startswith(allowed)]
assert not [n for n in names if n.endswith((".cpp", ".cu", ".h", ".cuh")) or "/tests/" in n or "/_build/" in n]
assert any(n.startswith("qpeft/_C.") and n.endswith(".so") for n in names) and "qpeft/_data/rcp_approx_f32.bin" in names
size_kb = wheel.stat().st_size // 1024
assert size_kb < 20 * 1024, f"wheel is {size_kb} KB"

import torch  # noqa: E402

import qpeft  # noqa: E402
from qpeft import reference as R  # noqa: E402
from qpeft.nn import LoraLinear4bit  # noqa: E402

assert "site-packages" in qpeft.__file__, qpeft.__file__
assert qpeft._ops._required_torch() == ".".join(torch.__version__.split(".")[:2]), "the wheel's torch pin"
W = torch.randn(70, 130)
q = qpeft.Quantized4bitWeight.from_float(W, "nf4", 64, double_quant=True)
assert torch.equal(
    q.dequantize(torch.float32),
    R.dequantize_4bit(q.packed.reshape(-1), q.fp32_scales(), 64, "nf4", W.shape, torch.float32),
)
layer = LoraLinear4bit.from_linear(torch.nn.Linear(128, 64), r=8, alpha=16, dropout=0.1).train()
opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
x, target = torch.randn(32, 128), torch.randn(32, 64)
losses = []
for _ in range(20):
    loss = torch.nn.functional.mse_loss(layer(x), target)
    loss.backward()
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
assert losses[-1] < losses[0], losses
info = json.loads(subprocess.run(["qpeft", "info"], capture_output=True, text=True, check=True).stdout)
assert info["build"]["torch"].split("+")[0] == torch.__version__.split("+")[0], info["build"]
demo = subprocess.run(["qpeft", "demo", "--steps", "4", "--quiet"], capture_output=True, text=True, timeout=600)
assert demo.returncode == 0, demo.stderr[-2000:]
print(
    f"wheel ok: {wheel.name}, {size_kb} KB, {len(names)} files, torch {torch.__version__}, "
    f"CPU level {qpeft.functional.cpu_isa()}, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
)
