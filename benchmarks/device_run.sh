#!/usr/bin/env bash
# One command for a GPU machine: build qpeft with CUDA, run the CUDA tests (the CPU ones are CI's), a memcheck
# pass over the CUDA kernels, a per-kernel profile of the layer, and the benchmarks (JSON + PNG plot).
# Logs, JSON and plots are packed into $OUT/results.tgz after every stage (the device tool brings back 8 files at
# most, and a run stopped at its time limit still returns what finished); the built wheel goes to $OUT too.
#   STAGES="tests memcheck profile ops layer dequant e2e plot" (default: all, in that order)
#   QPEFT_WHEEL=path/to/qpeft-*.whl skips the build (a wheel an earlier run left in $OUT, carried back).
# Optional: wheels of packages the machine lacks (bitsandbytes 0.50.2) in .whl/, installed to /tmp/site.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/benchmarks/results/device}
LOGS=$(mktemp -d /tmp/qpeft_run.XXXX)
ARCHS=${QPEFT_CUDA_ARCHS:-90}
STAGES=${STAGES:-tests memcheck profile ops layer dequant e2e plot}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
has() { [[ " $STAGES " == *" $1 "* ]]; }
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$REPO"/.whl/b*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$LOGS/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$LOGS/gpu.txt"
start=$(date +%s)
if [[ -n "${QPEFT_WHEEL:-}" ]]; then
  python3 -m pip install --no-deps -q "$QPEFT_WHEEL" || exit 1
else
  echo "== build (archs $ARCHS)"
  python3 -m pip wheel --no-build-isolation --no-deps -q -w /tmp/qpeft_wheel \
    -C cmake.define.QPEFT_CUDA_ARCHS="$ARCHS" "$REPO" >"$LOGS/build.log" 2>&1 || { tail -40 "$LOGS/build.log"; exit 1; }
  python3 -m pip install --no-deps -q /tmp/qpeft_wheel/qpeft-*.whl || exit 1
  cp /tmp/qpeft_wheel/qpeft-*.whl "$OUT/"
fi
echo "installed in $(( $(date +%s) - start )) s"
cd /tmp
python3 -c "import qpeft; print(qpeft.build_info())" | tee -a "$LOGS/gpu.txt"
stage() { tar czf "$OUT/results.tgz" -C "$LOGS" .; echo "== $1 ($(( $(date +%s) - start )) s)"; }
if has tests; then
  stage "CUDA tests"
  timeout 300 python3 -m pytest "$REPO/tests" -m cuda -q -rs -n 8 -p no:cacheprovider >"$LOGS/pytest.log" 2>&1
  echo "pytest exit $?"; grep -E "FAILED|ERROR|passed|failed" "$LOGS/pytest.log" | tail -25
  stage "CUDA tests with the tensor-core LoRA kernels"  # every layer/model test through the other kernel kind
  QPEFT_CUDA_LORA_KERNELS=tensor_cores timeout 300 python3 -m pytest "$REPO/tests" -m cuda -q -rs -n 8 \
    -p no:cacheprovider >"$LOGS/pytest_tensor_cores.log" 2>&1
  echo "pytest (tensor cores) exit $?"; grep -E "FAILED|ERROR|passed|failed" "$LOGS/pytest_tensor_cores.log" | tail -25
fi
if has memcheck; then
  stage "compute-sanitizer memcheck"
  timeout 180 compute-sanitizer --tool memcheck --error-exitcode 3 python3 "$REPO/benchmarks/cuda_smoke.py" \
    >"$LOGS/memcheck.log" 2>&1; echo "memcheck exit $?"; tail -4 "$LOGS/memcheck.log"
  QPEFT_CUDA_LORA_KERNELS=tensor_cores timeout 180 compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 "$REPO/benchmarks/cuda_smoke.py" >"$LOGS/memcheck_tensor_cores.log" 2>&1
  echo "memcheck (tensor cores) exit $?"; tail -4 "$LOGS/memcheck_tensor_cores.log"
fi
if has profile; then
  stage "profile"
  timeout 120 python3 "$REPO/benchmarks/profile_layer.py" --host >"$LOGS/profile.log" 2>&1; echo "profile exit $?"
  grep "^==" "$LOGS/profile.log"
  QPEFT_CUDA_LORA_KERNELS=tensor_cores timeout 120 python3 "$REPO/benchmarks/profile_layer.py" \
    >"$LOGS/profile_tensor_cores.log" 2>&1; echo "profile (tensor cores) exit $?"
  grep "^==" "$LOGS/profile_tensor_cores.log"
fi
if has ops; then
  stage "LoRA-branch ops, both kernel kinds"
  timeout 120 python3 "$REPO/benchmarks/bench_lora_ops.py" --device cuda --out "$LOGS" >"$LOGS/bench_lora_ops.log" 2>&1
  echo "exit $?"; tail -20 "$LOGS/bench_lora_ops.log"
fi
if has layer; then
  stage "layer benchmark"
  timeout 240 python3 "$REPO/benchmarks/bench_lora_layer.py" --device cuda --out "$LOGS" >"$LOGS/bench_lora_layer.log" 2>&1
  echo "exit $?"; tail -12 "$LOGS/bench_lora_layer.log"
fi
if has dequant; then
  stage "dequantize benchmark"
  timeout 60 python3 "$REPO/benchmarks/bench_dequantize.py" --device cuda --out "$LOGS" >"$LOGS/bench_dequantize.log" 2>&1
  echo "exit $?"; tail -6 "$LOGS/bench_dequantize.log"
fi
if has e2e; then
  stage "end-to-end benchmark"
  timeout 300 python3 "$REPO/benchmarks/bench_e2e.py" --device cuda --out "$LOGS" >"$LOGS/bench_e2e.log" 2>&1
  echo "exit $?"; tail -6 "$LOGS/bench_e2e.log"
fi
if has plot; then
  python3 "$REPO/benchmarks/plot_results.py" "$LOGS" 2>&1 | tail -3
fi
stage "done"
