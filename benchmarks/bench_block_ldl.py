"""yaqa::block_ldl vs a plain-PyTorch reference (cholesky + a per-block inverse loop).

    .venv/bin/python benchmarks/bench_block_ldl.py [--sizes 1024 4096 8192] [--devices cpu cuda]

Prints the median time of each and the ratio reference / ours (> 1: ours is faster).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_parser, device_name, median_seconds  # noqa: E402

import yaqa_ext  # noqa: E402


def reference_block_ldl(H: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What one writes without the op: Cholesky, then each block column times its block's inverse."""
    C = torch.linalg.cholesky(H)
    L = torch.empty_like(C)
    D = torch.empty(H.size(0) // b, b, b, dtype=H.dtype, device=H.device)
    for k in range(0, H.size(0), b):
        Ckk = C[k : k + b, k : k + b]
        D[k // b] = Ckk @ Ckk.T
        L[:, k : k + b] = C[:, k : k + b] @ torch.linalg.inv(Ckk)
    return L, D


def spd(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    X = torch.randn(n + 256, n, dtype=dtype, device=device)
    return X.T @ X / n + 0.1 * torch.eye(n, dtype=dtype, device=device)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024, 4096, 8192])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"block_ldl, {args.dtype}, block size {args.block_size}, torch {torch.__version__}")
    print(f"{'device':40s} {'n':>6s} {'ours ms':>10s} {'reference ms':>13s} {'ratio':>7s}")
    for device in args.devices:
        for n in args.sizes:
            H = spd(n, dtype, device)
            ours = median_seconds(lambda: yaqa_ext.ops.block_ldl(H, args.block_size), device, args.repeats)
            ref = median_seconds(lambda: reference_block_ldl(H, args.block_size), device, args.repeats)
            print(f"{device_name(device):40s} {n:6d} {1e3 * ours:10.2f} {1e3 * ref:13.2f} {ref / ours:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
