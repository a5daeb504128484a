"""The vector and trellis codebooks (E8P, trellis) against the INT grid of the same bits, measured in one run:
encode time per layer (round-to-nearest, and LDLQ with an input factor, tiles of each codebook's unit), and
QuantizedLinear latency (RHT on) against INT and nn.Linear fp32 at several batch sizes.

    .venv/bin/python benchmarks/bench_codebooks.py [--bits 2 4] [--shapes 576x1536 4096x4096] [--batches 1 16 256]

Shapes are out x in. Ratios > 1: the codebook is faster than the column's baseline.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_parser, device_name, median_seconds  # noqa: E402

from yaqa_ext import block_ldl, ldlq_round  # noqa: E402
from yaqa_ext.codebooks import E8PCodebook, IntCodebook, TrellisCodebook  # noqa: E402
from yaqa_ext.hadamard import RHT  # noqa: E402
from yaqa_ext.qlinear import QuantizedLinear  # noqa: E402
from yaqa_ext.rounding import round_to_nearest  # noqa: E402


def input_factor(n: int, device: str, block: int) -> torch.Tensor:
    X = torch.randn(2 * n, n, device=device) * torch.logspace(0, -1, n, device=device)
    H = X.T @ X / (2 * n) + 1e-2 * torch.eye(n, device=device)
    return block_ldl(H, block).L


def main() -> None:
    parser = benchmark_parser(__doc__, repeats=3)
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 256])
    parser.add_argument("--shapes", nargs="+", default=["576x1536", "2048x2048", "4096x4096"])
    parser.add_argument("--codebooks", nargs="+", default=["e8p", "trellis"], choices=["e8p", "trellis"])
    args = parser.parse_args()
    print(f"codebooks vs INT, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for device in args.devices:
        for shape in args.shapes:
            m, n = map(int, shape.split("x"))
            W = torch.randn(m, n, device=device)
            L_in = {8: input_factor(n, device, 8), 16: input_factor(n, device, 16)}
            rht = RHT(m, n, seed=0, device=device)
            dense = torch.nn.Linear(n, m, bias=False, device=device)
            for bits in args.bits:
                layers = {}
                books = {"e8p": lambda: E8PCodebook(bits), "trellis": lambda: TrellisCodebook(bits)}
                for name in [*args.codebooks, "int"]:
                    book = IntCodebook(bits) if name == "int" else books[name]()
                    grid = book.fit(W)
                    tiles = (16, 16) if name == "trellis" else (1, 8)
                    rtn = median_seconds(lambda: round_to_nearest(W, grid), device, 1)
                    ldlq = median_seconds(lambda: ldlq_round(W, L_in[tiles[1]], None, quantizer=grid, td_x=tiles[0],
                                                             td_y=tiles[1]), device, 1)
                    rounded = round_to_nearest(W, grid)
                    layers[name] = QuantizedLinear.from_rounding(rounded, grid, rht, None)
                    print(f"{device_name(device)} {shape} {bits}-bit {name}: encode {rtn:.2f} s round-to-nearest, "
                          f"{ldlq:.2f} s LDLQ (tiles {tiles[0]} x {tiles[1]})", flush=True)
                for batch in args.batches:
                    x = torch.randn(batch, n, device=device)
                    with torch.no_grad():
                        t = {k: median_seconds(lambda q=q: q(x), device, args.repeats) for k, q in layers.items()}
                        fp32 = median_seconds(lambda: dense(x), device, args.repeats)
                    ours = " ".join(f"{k} {1e3 * v:8.3f} ms (int/{k} {t['int'] / v:.2f}x, fp32/{k} {fp32 / v:.2f}x)"
                                    for k, v in t.items() if k != "int")
                    print(f"  {shape} {bits}-bit batch {batch:4d}: int {1e3 * t['int']:8.3f} ms, nn.Linear fp32 "
                          f"{1e3 * fp32:8.3f} ms; {ours}", flush=True)

if __name__ == "__main__":
    main()
