#!/usr/bin/env bash
# Syntax-checks the CUDA side of the torch glue (csrc/ops/*.cpp with QPEFT_WITH_CUDA) against the installed
# torch's headers and the CUDA toolkit's, so that glue for the GPU cannot break unnoticed on a CPU-only machine.
# (The CPU torch wheel ships the c10/cuda headers; ATen/cuda ones need cuBLAS/cuSPARSE headers, so the glue uses
# c10/cuda only.)
set -euo pipefail
cd "$(dirname "$0")/.."
# The toolkit's include directory, as nvcc itself reports it (nvcc may be a wrapper script).
CUDA_INCLUDE=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)
mapfile -t TORCH_INCLUDES < <(python -c "import torch.utils.cpp_extension as e; print('\n'.join(e.include_paths()))")
ABI=$(python -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
PY_INCLUDE=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
for src in csrc/ops/*.cpp; do
  "${CXX:-g++}" -std=c++20 -fsyntax-only -Wall -Werror -DQPEFT_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
    -D_GLIBCXX_USE_CXX11_ABI="$ABI" "${TORCH_INCLUDES[@]/#/-isystem}" -isystem "$CUDA_INCLUDE" -isystem "$PY_INCLUDE" "$src"
  echo "checked $src (QPEFT_WITH_CUDA)"
done
