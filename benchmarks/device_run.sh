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
# Tests, memcheck and profile run once per LoRA-branch kernel kind (QPEFT_CUDA_LORA_KERNELS), so every layer and
# model test goes through both; logs are named after the kind.
KINDS="cuda_cores tensor_cores"
if has tests; then
  for kind in $KINDS; do
    stage "CUDA tests, $kind LoRA kernels"
    QPEFT_CUDA_LORA_KERNELS=$kind timeout 300 python3 -m pytest "$REPO/tests" -m cuda -q -rs -n 8 \
      -p no:cacheprovider >"$LOGS/pytest_$kind.log" 2>&1
    echo "pytest ($kind) exit $?"; grep -E "FAILED|ERROR|passed|failed" "$LOGS/pytest_$kind.log" | tail -25
  done
fi
if has memcheck; then
  for kind in $KINDS; do
    stage "compute-sanitizer memcheck, $kind LoRA kernels"
    QPEFT_CUDA_LORA_KERNELS=$kind timeout 180 compute-sanitizer --tool memcheck --error-exitcode 3 \
      python3 "$REPO/benchmarks/cuda_smoke.py" >"$LOGS/memcheck_$kind.log" 2>&1
    echo "memcheck ($kind) exit $?"; tail -4 "$LOGS/memcheck_$kind.log"
  done
fi
if has profile; then
  for kind in $KINDS; do
    stage "profile, $kind LoRA kernels"
    QPEFT_CUDA_LORA_KERNELS=$kind timeout 120 python3 "$REPO/benchmarks/profile_layer.py" --host \
      >"$LOGS/profile_$kind.log" 2>&1; echo "profile ($kind) exit $?"
    grep "^==" "$LOGS/profile_$kind.log"
  done
fi
# bench TITLE SCRIPT TIMEOUT_S TAIL_LINES: one benchmark script, its log named after it.
bench() {
  stage "$1"
  local log="$LOGS/$(basename "$2" .py).log"
  timeout "$3" python3 "$REPO/benchmarks/$2" --device cuda --out "$LOGS" >"$log" 2>&1
  echo "exit $?"; tail -"$4" "$log"
}
if has ops; then bench "LoRA-branch ops, both kernel kinds" bench_lora_ops.py 120 20; fi
if has layer; then bench "layer benchmark" bench_lora_layer.py 300 22; fi
if has dequant; then bench "dequantize benchmark" bench_dequantize.py 60 6; fi
if has e2e; then bench "end-to-end benchmark" bench_e2e.py 420 7; fi
if has plot; then
  python3 "$REPO/benchmarks/plot_results.py" "$LOGS" 2>&1 | tail -3
fi
stage "done"
