"""Hessian collection throughput, cost relative to a plain forward+backward, and efficiency.

    .venv/bin/python benchmarks/bench_collect.py [--model smollm2-135m] [--n-seqs 8] [--seq-len 512]

For each sketch (input, A with 1 half-iteration, B) it prints tokens/s (all passes counted), the
cost as a ratio to one plain training-style forward+backward (parameter gradients included) of
the same tokens measured in the same run, and the efficiency: the flops the collection must do
(forward 2mn per token per linear, activation backward the same, factor updates as SYRK/GEMM
flop counts) divided by time x the fp32 torch.matmul throughput of this device.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_parser, device_name, median_seconds  # noqa: E402

from yaqa_ext.data import corpus_texts, prepare_tokens  # noqa: E402
from yaqa_ext.arch import find_targets  # noqa: E402
from yaqa_ext.hessians import _round_plan, collect_hessians  # noqa: E402
from yaqa_ext.models import load_model  # noqa: E402


def pass_flops(kind: str, shapes: list[tuple[int, int]], n_seqs: int, seq_len: int) -> float:
    """Flops of one pass over n_seqs x seq_len tokens for linears of (out m, in n) shapes."""
    tokens = n_seqs * seq_len
    fwd = sum(2 * m * n for m, n in shapes) * tokens
    if kind == "input":
        return fwd + sum(n * (n + 1) for m, n in shapes) * tokens
    if kind == "B":
        per_seq = sum(2 * m * n * seq_len + m * n * (n + 1) + n * m * (m + 1) for m, n in shapes)
        return 2 * fwd + per_seq * n_seqs
    # A half-iteration: token weights v P v^T (2k^2 per token) and the weighted GEMM (2 q^2 per token)
    return 2 * fwd + sum(2 * m * m + 2 * n * n for m, n in shapes) * tokens


def plain_step(model, tokens: torch.Tensor, batch_size: int) -> None:
    for batch in tokens.split(batch_size):
        logits = model(input_ids=batch, use_cache=False).logits.float()
        F.cross_entropy(logits.flatten(0, 1), batch.flatten()).backward()
    model.zero_grad(set_to_none=True)


def matmul_gflops(device: str, dtype: torch.dtype, size: int, repeats: int) -> float:
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / median_seconds(lambda: a @ b, device, repeats) / 1e9


def main() -> None:
    parser = benchmark_parser(__doc__, repeats=3)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-seqs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tf32", action="store_true")
    args = parser.parse_args()
    print(f"Hessian collection on {args.model}, {args.n_seqs} x {args.seq_len} tokens, batch {args.batch_size}, "
          f"torch {torch.__version__}")
    print(f"{'device':36s} {'sketch':>6s} {'passes':>6s} {'s':>7s} {'tokens/s':>9s} {'x fwd+bwd':>9s} "
          f"{'GFLOP/s':>8s} {'matmul':>8s} {'eff.':>6s}")
    for device in args.devices:
        model, tokenizer = load_model(args.model, device=device)
        tokens = prepare_tokens(corpus_texts("calibration"), tokenizer, args.n_seqs, args.seq_len).to(device)
        shapes = [(t.out_features, t.in_features) for t in find_targets(model)]
        plain = median_seconds(lambda: plain_step(model, tokens, args.batch_size), device, args.repeats)
        peak = matmul_gflops(device, torch.float32, 8192 if device.startswith("cuda") else 512, args.repeats)
        for sketch in ("input", "A", "B"):
            plan = _round_plan(sketch, 1)

            def run() -> None:
                with tempfile.TemporaryDirectory() as out:
                    collect_hessians(model, tokens, out, sketch=sketch, n_seqs=args.n_seqs, seq_len=args.seq_len,
                                     batch_size=args.batch_size, allow_tf32=args.tf32, progress=False)

            seconds = median_seconds(run, device, args.repeats)
            flops = sum(pass_flops(k, shapes, args.n_seqs, args.seq_len) for k in plan)
            achieved = flops / seconds / 1e9
            print(f"{device_name(device):36s} {sketch:>6s} {len(plan):6d} {seconds:7.2f} "
                  f"{len(plan) * tokens.numel() / seconds:9.0f} {seconds / plain:8.2f}x {achieved:8.2f} {peak:8.1f} "
                  f"{achieved / peak:6.1%}", flush=True)


if __name__ == "__main__":
    main()
