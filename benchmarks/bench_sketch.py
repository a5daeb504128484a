"""yaqa::sketch_b_update vs the naive per-sequence einsum formulation, and its efficiency.

    .venv/bin/python benchmarks/bench_sketch.py [--shapes 4096,4096,2048 4096,14336,2048] [--batch 4]

Efficiency = the flops the update needs (Gw_b = G_b^T X_b: 2mnT per sequence; the symmetric
factors: mn(n+1) + nm(m+1) per sequence, as SYRK counts them) per second, divided by the fp32
`torch.matmul` throughput measured in the same run on a square product of similar size.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_parser, device_name, median_seconds  # noqa: E402

from yaqa_ext import sketch_b_update  # noqa: E402


def einsum_sketch_b(X: torch.Tensor, G: torch.Tensor, H_in: torch.Tensor, H_out: torch.Tensor) -> None:
    """The formulation without the op: per-sequence gradients, then two einsum contractions."""
    Gw = torch.einsum("btm,btn->bmn", G, X)
    H_in += torch.einsum("bmn,bmk->nk", Gw, Gw)
    H_out += torch.einsum("bmn,bkn->mk", Gw, Gw)


def matmul_gflops(size: int, device: str, repeats: int) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    return 2 * size**3 / median_seconds(lambda: a @ b, device, repeats) / 1e9


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--shapes", nargs="+", default=None, help="n,m,T triples (default: GPU 4096,4096,2048 "
                        "and 4096,14336,2048; CPU 512,512,256 and 512,1792,256)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per update (default: %(default)s)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 on GPU (the matmul baseline too)")
    args = parser.parse_args()
    print(f"sketch_b_update, fp32 products{' (TF32 allowed)' if args.tf32 else ''}, batch {args.batch}, torch {torch.__version__}")
    print(f"{'device':40s} {'n':>6s} {'m':>6s} {'T':>5s} {'ours ms':>9s} {'einsum ms':>10s} {'speedup':>8s} "
          f"{'GFLOP/s':>9s} {'matmul':>8s} {'eff.':>6s}")
    for device in args.devices:
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        default = ["4096,4096,2048", "4096,14336,2048"] if device.startswith("cuda") else ["512,512,256", "512,1792,256"]
        for shape in args.shapes or default:
            n, m, T = (int(v) for v in shape.split(","))
            B = args.batch
            X, G = torch.randn(B, T, n, device=device), torch.randn(B, T, m, device=device)
            H_in, H_out = torch.zeros(n, n, device=device), torch.zeros(m, m, device=device)
            ours = median_seconds(lambda: sketch_b_update(X, G, H_in, H_out, allow_tf32=args.tf32), device, args.repeats)
            naive = median_seconds(lambda: einsum_sketch_b(X, G, H_in, H_out), device, args.repeats)
            flops = B * (2 * m * n * T + m * n * (n + 1) + n * m * (m + 1))
            peak = matmul_gflops(max(n, m) if device.startswith("cuda") else 1024, device, args.repeats)
            achieved = flops / ours / 1e9
            print(f"{device_name(device):40s} {n:6d} {m:6d} {T:5d} {1e3 * ours:9.1f} {1e3 * naive:10.1f} "
                  f"{naive / ours:7.2f}x {achieved:9.1f} {peak:8.1f} {achieved / peak:6.1%}", flush=True)


if __name__ == "__main__":
    main()
