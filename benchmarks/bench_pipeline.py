"""The whole `yaqa run` on SmolLM2-135M, part by part: where the time goes.

    .venv/bin/python benchmarks/bench_pipeline.py [--n-seqs 16] [--seq-len 512] [--method yaqa] [--bits 2]

Collection of Sketch B on n-seqs x seq-len tokens is timed whole and split into: the model's own forward
and backward (the same batches, embeddings output requiring grad and the sampled loss's gradient, without
the collection's hooks, timed separately in the same run after one warm-up batch, its own target sampling
taken out: the floor any collection pays), the sketch updates, the sampling of targets and the writing of
the factor files (timed inside the collection by wrapping those functions), and the rest. Then one
quantization (--method, --bits) and one evaluation on --eval-seqs x --eval-len tokens (the original's
logits once, then the quantized model's). The last column scales the per-batch parts of the collection
linearly to --target-seqs sequences.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import benchmark_parser, device_name  # noqa: E402

from yaqa_ext import QuantConfig, collect_hessians, dequantize, evaluate, hessians, quantize  # noqa: E402
from yaqa_ext.data import corpus_texts, prepare_tokens  # noqa: E402
from yaqa_ext.evaluation import reference_logits  # noqa: E402
from yaqa_ext.methods import METHODS  # noqa: E402
from yaqa_ext.models import load_model  # noqa: E402

SECONDS: dict[str, float] = defaultdict(float)


def timed(label: str, fn):
    """fn, adding its wall time to SECONDS[label]."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SECONDS[label] += time.perf_counter() - start

    return wrapper


def model_forward_backward(model, tokens: torch.Tensor, batch_size: int, seq_len: int) -> float:
    """Seconds of the collection's forward and backward without its hooks or its target sampling (after one
    untimed warm-up batch): the floor of any collection. Call it with the sampling functions wrapped by
    :func:`timed`."""
    for p in model.parameters():
        p.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))

    def step(b: int, batch: torch.Tensor) -> None:
        logits = model(input_ids=batch, use_cache=False).logits
        hessians._backward_sampled_loss(logits, 0, 0, list(range(b * batch_size, b * batch_size + batch.size(0))),
                                        seq_len)

    step(0, tokens[:batch_size])
    SECONDS.clear()
    start = time.perf_counter()
    for b, batch in enumerate(tokens.split(batch_size)):
        step(b, batch)
    handle.remove()
    seconds = time.perf_counter() - start - SECONDS.pop("sampling targets", 0.0)
    SECONDS.clear()
    return seconds


def main() -> None:
    parser = benchmark_parser(__doc__, repeats=1)
    parser.add_argument("--n-seqs", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--method", choices=list(METHODS), default="yaqa")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--eval-seqs", type=int, default=64)
    parser.add_argument("--eval-len", type=int, default=256)
    parser.add_argument("--target-seqs", type=int, default=128)
    args = parser.parse_args()
    device = args.devices[-1]
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m", device=device)
    load = time.perf_counter() - start
    calib = prepare_tokens(corpus_texts("calibration"), tokenizer, args.n_seqs, args.seq_len).to(device)
    hessians._probabilities = timed("sampling targets", hessians._probabilities)
    hessians._draw = timed("sampling targets", hessians._draw)
    floor = model_forward_backward(model, calib, args.batch_size, args.seq_len)

    hessians.ops.sketch_b_update = timed("sketch updates", hessians.ops.sketch_b_update)
    hessians.ops.input_moment_update = timed("sketch updates", hessians.ops.input_moment_update)
    hessians._write_layers = timed("writing factor files", hessians._write_layers)
    with tempfile.TemporaryDirectory() as tmp:
        method = METHODS[args.method]
        sketch = method.default_sketch
        start = time.perf_counter()
        if method.needs_data:
            collect_hessians(model, calib, tmp, sketch=sketch, n_seqs=args.n_seqs, seq_len=args.seq_len,
                             batch_size=args.batch_size, progress=False)
        collect = time.perf_counter() - start
        q = copy.deepcopy(model)
        start = time.perf_counter()
        quantize(q, QuantConfig(method=args.method, bits=args.bits), hessians=tmp if method.needs_data else None,
                 progress=False)
        quant = time.perf_counter() - start
    evaluation = prepare_tokens(corpus_texts("evaluation"), tokenizer, args.eval_seqs, args.eval_len)
    start = time.perf_counter()
    orig = reference_logits(model, evaluation, args.batch_size)
    ref_time = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate(None, dequantize(q), evaluation, n_seqs=args.eval_seqs, seq_len=args.eval_len,
                      batch_size=args.batch_size, orig_logits=orig)
    eval_time = time.perf_counter() - start

    parts = dict(SECONDS)
    once = parts.get("writing factor files", 0.0)  # once per collection, not per batch
    rest = collect - floor - sum(parts.values())
    scale = args.target_seqs / args.n_seqs
    print(f"yaqa run on SmolLM2-135M, {device_name(device)}, torch {torch.__version__}; collection sketch {sketch} on "
          f"{args.n_seqs} x {args.seq_len} tokens (batch {args.batch_size}), {args.method} {args.bits}-bit, evaluation "
          f"{args.eval_seqs} x {args.eval_len} tokens (KL {result.kl:.4f})")
    print(f"{'part':50s} {'seconds':>9s} {f'{args.target_seqs} seqs':>10s}")
    rows = [("load model (cached GGUF conversion)", load, load),
            ("collection, total", collect, (collect - once) * scale + once),
            ("  model forward + backward (timed alone)", floor, floor * scale),
            *((f"  {k}", v, v if k == "writing factor files" else v * scale) for k, v in parts.items()),
            ("  rest (hooks, checks, checkpoints)", rest, rest * scale),
            (f"quantize ({args.method}, {args.bits}-bit)", quant, quant),
            ("evaluation: the original's logits (once per run)", ref_time, ref_time),
            ("evaluation: one quantized model", eval_time, eval_time)]
    for label, seconds, scaled in rows:
        print(f"{label:50s} {seconds:9.1f} {scaled:10.1f}")
    total = load + (collect - once) * scale + once + quant + ref_time + eval_time
    print(f"{f'total, {args.target_seqs} x {args.seq_len} calibration tokens':50s} {'':9s} {total:10.1f}")


if __name__ == "__main__":
    main()
