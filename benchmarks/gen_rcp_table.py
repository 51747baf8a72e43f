"""Regenerates qpeft/_data/rcp_approx_f32.bin from the GPU's rcp.approx.ftz.f32 (run on a CUDA machine).

For every fp32 mantissa m (x = 1.m in [1, 2)), delta = bits(rcp.approx(x)) - bits(RN(1 / x)), in {-1, 0, +1};
entries delta + 1 are packed 4 per byte (mantissa 4j + i in bits 2i..2i+1 of byte j) and zlib-compressed.
The result only depends on the mantissa for every normal result (checked on an H100 for exponents 1..252).

    python benchmarks/gen_rcp_table.py            # compare with the committed table (exit 1 if different)
    python benchmarks/gen_rcp_table.py --write    # overwrite it
"""

import argparse
import sys
import zlib

import torch

import qpeft  # noqa: F401  (registers torch.ops.qpeft)
from qpeft import reference as R


def measure() -> bytes:
    mantissas = torch.arange(2**23, dtype=torch.int32)
    x = (mantissas | (127 << 23)).view(torch.float32).cuda()
    delta = torch.ops.qpeft._approx_reciprocal(x).view(torch.int32) - (1.0 / x).view(torch.int32)
    if delta.abs().max() > 1:
        raise SystemExit("rcp.approx is more than one ulp from the correctly rounded reciprocal: unexpected GPU")
    entries = (delta + 1).to(torch.uint8).cpu().reshape(-1, 4)
    packed = entries[:, 0] | (entries[:, 1] << 2) | (entries[:, 2] << 4) | (entries[:, 3] << 6)
    return bytes(packed.numpy().tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    table = measure()
    if args.write:
        R.RCP_TABLE_PATH.write_bytes(zlib.compress(table, 9))
        print("wrote", R.RCP_TABLE_PATH)
        return
    same = table == R.reciprocal_table_bytes()
    print(f"{torch.cuda.get_device_name()}: GPU reciprocal {'matches' if same else 'DIFFERS FROM'} the committed table")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
