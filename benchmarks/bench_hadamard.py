"""yaqa::hadamard_transform vs a dense matmul with the same orthonormal Hadamard matrix.

    .venv/bin/python benchmarks/bench_hadamard.py [--sizes 1024 4096 11008 14336] [--rows 512]

Prints median times and the ratio dense / ours (> 1: ours is faster).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_parser, device_name, median_seconds  # noqa: E402

from yaqa_ext import hadamard_matrix, hadamard_transform  # noqa: E402


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024, 4096, 11008, 14336])
    parser.add_argument("--rows", type=int, default=None, help="rows transformed (default: 512 on CPU, 8192 on GPU)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"hadamard_transform, {args.dtype}, torch {torch.__version__}")
    print(f"{'device':40s} {'rows':>6s} {'n':>6s} {'ours ms':>9s} {'dense ms':>9s} {'ratio':>7s} {'ours GB/s':>9s}")
    for device in args.devices:
        rows = args.rows or (512 if device == "cpu" else 8192)
        for n in args.sizes:
            x = torch.randn(rows, n, device=device).to(dtype)
            dense_t = hadamard_matrix(n, dtype, device).T.contiguous()
            ours = median_seconds(lambda: hadamard_transform(x), device, args.repeats)
            dense = median_seconds(lambda: x @ dense_t, device, args.repeats)
            gbs = 2 * x.numel() * x.element_size() / ours / 1e9
            print(f"{device_name(device):40s} {rows:6d} {n:6d} {1e3 * ours:9.2f} {1e3 * dense:9.2f} {dense / ours:6.2f}x {gbs:9.1f}", flush=True)


if __name__ == "__main__":
    main()
