"""yaqa::sketch_b_update against the YAQA reference's own formula, on every layer shape of SmolLM2-135M
and of Llama-3-8B.

    .venv/bin/python benchmarks/bench_sketch.py [--models smollm2 llama3-8b] [--seq-len 512] [--batch 2]

The reference (hessian_llama/custom_linear_B.py of Cornell-RelaxML/yaqa) forms each factor with one
4-operand einsum per batch, ``einsum('btm,btn,bsm,bsk->nk', G, X, G, X)`` for H_in and
``einsum('btm,btn,bsk,bsn->mk', G, X, G, X)`` for H_out, contracted in the order opt_einsum finds
cheapest (torch uses opt_einsum when it is installed; the script refuses to run without it, so the
baseline is never a weakened one). Columns: our op with the contraction chosen per shape ("auto"), our
op forced to form per-sequence gradients first (the previous default), the reference, and the speedup
of "auto" over the reference. The flops column counts what "auto" computes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_parser, device_name, median_seconds  # noqa: E402

from yaqa_ext import sketch_b_update  # noqa: E402

# (name, in_features n, out_features m) of each distinct linear layer shape
MODELS = {
    "smollm2": [("q_proj/o_proj", 576, 576), ("k_proj/v_proj", 576, 192), ("gate_proj/up_proj", 576, 1536),
                ("down_proj", 1536, 576)],
    "llama3-8b": [("q_proj/o_proj", 4096, 4096), ("k_proj/v_proj", 4096, 1024), ("gate_proj/up_proj", 4096, 14336),
                  ("down_proj", 14336, 4096)],
}


def reference_sketch_b(X: torch.Tensor, G: torch.Tensor, H_in: torch.Tensor, H_out: torch.Tensor) -> None:
    """The reference's two 4-operand einsums (fp32 products), added to the accumulators."""
    H_in += torch.einsum("btm,btn,bsm,bsk->nk", G, X, G, X)
    H_out += torch.einsum("btm,btn,bsk,bsn->mk", G, X, G, X)


def auto_flops(B: int, T: int, n: int, m: int) -> float:
    """Flops of the contraction "auto" picks (the cost model of csrc/sketch.h, unweighted)."""
    gradient = 2 * T * m * n + m * n * n + n * m * m
    gram = (2 * T * T * (m + n) + T * n * n) + (2 * T * T * (m + n) + T * m * m)
    mixed = min(2 * T * m * n + m * n * n + 2 * T * T * (m + n) + T * m * m,
                2 * T * m * n + n * m * m + 2 * T * T * (m + n) + T * n * n)
    return B * min(gradient, gram, mixed)


def main() -> None:
    parser = benchmark_parser(__doc__, repeats=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 512 on CPU, 2048 on GPU)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per update (default: 2 on CPU, 4 on GPU)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 on GPU (for the reference too)")
    args = parser.parse_args()
    if not (torch.backends.opt_einsum.is_available() and torch.backends.opt_einsum.enabled):
        raise SystemExit("opt_einsum is not available to torch: `pip install opt_einsum` (the reference's path needs it)")
    print(f"sketch_b_update vs the reference einsums (opt_einsum {torch.backends.opt_einsum.strategy}), fp32 products"
          f"{' (TF32 allowed)' if args.tf32 else ''}, torch {torch.__version__}")
    print(f"{'device':34s} {'model':9s} {'layer':18s} {'n':>6s} {'m':>6s} {'B x T':>8s} {'auto ms':>9s} "
          f"{'gradient ms':>11s} {'reference ms':>12s} {'speedup':>8s} {'GFLOP/s':>8s}")
    for device in args.devices:
        cuda = device.startswith("cuda")
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        T = args.seq_len or (2048 if cuda else 512)
        B = args.batch or (4 if cuda else 2)
        for model in args.models:
            for layer, n, m in MODELS[model]:
                X, G = torch.randn(B, T, n, device=device), torch.randn(B, T, m, device=device) / T
                H_in, H_out = torch.zeros(n, n, device=device), torch.zeros(m, m, device=device)
                time = {c: median_seconds(lambda c=c: sketch_b_update(X, G, H_in, H_out, allow_tf32=args.tf32,
                                                                      contraction=c), device, args.repeats)
                        for c in ("auto", "gradient")}
                ref = median_seconds(lambda: reference_sketch_b(X, G, H_in, H_out), device, args.repeats)
                print(f"{device_name(device):34s} {model:9s} {layer:18s} {n:6d} {m:6d} {f'{B}x{T}':>8s} "
                      f"{1e3 * time['auto']:9.1f} {1e3 * time['gradient']:11.1f} {1e3 * ref:12.1f} "
                      f"{ref / time['auto']:7.2f}x {auto_flops(B, T, n, m) / time['auto'] / 1e9:8.1f}", flush=True)
                del X, G, H_in, H_out


if __name__ == "__main__":
    main()
