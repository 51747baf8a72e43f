#!/usr/bin/env bash
# One command for a GPU machine: build qpeft with CUDA, run every test (CUDA ones included), a memcheck pass
# over the CUDA kernels, and the benchmarks. Logs and JSON go to $OUT (default benchmarks/results/device).
# Optional: wheels of packages the machine lacks (bitsandbytes 0.50.2) in .whl/, installed to /tmp/site.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/benchmarks/results/device}
ARCHS=${QPEFT_CUDA_ARCHS:-90}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$REPO"/.whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
echo "== build (archs $ARCHS)"
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -q -C cmake.define.QPEFT_CUDA_ARCHS="$ARCHS" "$REPO" \
  >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
cd /tmp
python3 -c "import qpeft; print(qpeft.build_info())" | tee -a "$OUT/gpu.txt"
echo "== tests"
python3 -m pytest "$REPO/tests" -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -15
echo "== reciprocal table"
python3 "$REPO/benchmarks/gen_rcp_table.py" 2>&1 | tee "$OUT/rcp_table.log"
echo "== compute-sanitizer memcheck"
timeout 300 compute-sanitizer --tool memcheck --error-exitcode 3 python3 "$REPO/benchmarks/cuda_smoke.py" \
  >"$OUT/memcheck.log" 2>&1; echo "memcheck exit $?"; tail -4 "$OUT/memcheck.log"
echo "== benchmarks"
python3 "$REPO/benchmarks/bench_dequantize.py" --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench_dequantize.log"
python3 "$REPO/benchmarks/bench_lora_layer.py" --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench_lora_layer.log"
python3 "$REPO/benchmarks/bench_e2e.py" --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench_e2e.log"
