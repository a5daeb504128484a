"""yaqa::ldlq_round (two-sided, INT4 per-tensor grid) vs a naive tile-by-tile implementation.

    .venv/bin/python benchmarks/bench_ldlq.py [--compare 1024] [--alone 4096] [--tile 16]

The naive version rounds the same tiles in the same wavefront order but recomputes each tile's
feedback [E L_in + L_out^T E + L_out^T E L_in]_ij from the current E (O(m n td) per tile); the
op keeps it incrementally (O(mn(m + n)) in all). Prints median times and the ratio.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_parser, device_name, median_seconds  # noqa: E402

from yaqa_ext import IntCodebook, block_ldl, ldlq_round  # noqa: E402


def below_diagonal_blocks(L: torch.Tensor, t: int) -> torch.Tensor:
    blk = torch.arange(L.size(0), device=L.device) // t
    return torch.where(blk[:, None] > blk[None, :], L, 0)


def naive_two_sided(W, L_in, L_out, p, t):
    m, n = W.shape
    Li, Lo = below_diagonal_blocks(L_in, t), below_diagonal_blocks(L_out, t)
    E = torch.zeros_like(W)
    W_hat = torch.empty_like(W)
    s, z = p.expand(p.scales), p.expand(p.zeros)
    mt, nt = m // t, n // t
    for w in range(mt + nt - 2, -1, -1):
        for i in range(max(0, w - nt + 1), min(w, mt - 1) + 1):
            r, c = slice(i * t, (i + 1) * t), slice((w - i) * t, (w - i + 1) * t)
            ELi = E @ Li[:, c]
            x = W[r, c] + ELi[r] + Lo[:, r].T @ E[:, c] + Lo[:, r].T @ ELi
            q = torch.round(x / s[r, c] + z[r, c]).clamp(0, 2**p.bits - 1)
            W_hat[r, c] = (q - z[r, c]) * s[r, c]
            E[r, c] = W[r, c] - W_hat[r, c]
    return W_hat


def problem(m: int, n: int, t: int, device: str):
    X_in = torch.randn(2 * n, n, device=device) * torch.logspace(0, -1, n, device=device)
    X_out = torch.randn(2 * m, m, device=device) * torch.logspace(0, -1, m, device=device)
    H_in = X_in.T @ X_in / (2 * n) + 1e-2 * torch.eye(n, device=device)
    H_out = X_out.T @ X_out / (2 * m) + 1e-2 * torch.eye(m, device=device)
    W = torch.randn(m, n, device=device)
    return W, block_ldl(H_in, t).L, block_ldl(H_out, t).L


def main() -> None:
    parser = benchmark_parser(__doc__, repeats=3)
    parser.add_argument("--compare", type=int, default=1024, help="size of the square comparison (default: %(default)s)")
    parser.add_argument("--alone", type=int, default=4096, help="size timed alone (default: %(default)s)")
    parser.add_argument("--tile", type=int, default=16)
    args = parser.parse_args()
    t = args.tile
    print(f"ldlq_round two-sided, INT4 per-tensor, {t}x{t} tiles, torch {torch.__version__}")
    for device in args.devices:
        W, L_in, L_out = problem(args.compare, args.compare, t, device)
        p = IntCodebook(4).fit(W)
        ours = median_seconds(lambda: ldlq_round(W, L_in, L_out, quantizer=p, td_x=t, td_y=t), device, args.repeats)
        naive = median_seconds(lambda: naive_two_sided(W, L_in, L_out, p, t), device, 1, warmup=0)
        same = torch.equal(ldlq_round(W, L_in, L_out, quantizer=p, td_x=t, td_y=t).W_hat, naive_two_sided(W, L_in, L_out, p, t))
        print(f"{device_name(device)}: {args.compare}x{args.compare}: ours {1e3 * ours:.1f} ms, naive {1e3 * naive:.1f} ms, "
              f"ratio {naive / ours:.1f}x (identical result: {same})", flush=True)
        W, L_in, L_out = problem(args.alone, args.alone, t, device)
        p = IntCodebook(4).fit(W)
        alone = median_seconds(lambda: ldlq_round(W, L_in, L_out, quantizer=p, td_x=t, td_y=t), device, args.repeats)
        print(f"{device_name(device)}: {args.alone}x{args.alone}: ours {1e3 * alone:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
