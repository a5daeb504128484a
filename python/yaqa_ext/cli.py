"""The ``yaqa`` command line."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .models import DEFAULT_MODEL

__all__ = ["main"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _layers(text: str) -> list[int]:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _parser() -> argparse.ArgumentParser:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(prog="yaqa", description="Model-preserving quantization of LLMs (YAQA).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="factor a real model's layer Hessians with block_ldl")
    demo.add_argument("--model", default=DEFAULT_MODEL, help="llama2.c folder, HF folder or hub id (default: %(default)s)")
    demo.add_argument("--data", default=None, help="text file or folder (default: the shared Moby-Dick text)")
    demo.add_argument("--n-seqs", type=int, default=16, help="calibration sequences (default: %(default)s)")
    demo.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    demo.add_argument("--block-size", type=int, default=16, help="LDL block size cap (default: %(default)s)")
    demo.add_argument("--device", default=default_device, help="default: %(default)s")

    col = sub.add_parser("collect", help="collect Kronecker-factored Hessians (Sketch A / B) or input moments",
                         description="Collect each decoder linear layer's Hessian factors into --out. Resumable: "
                         "run the same command again after an interruption. Under torchrun every rank takes "
                         "its share of the sequences.")
    col.add_argument("--model", default=DEFAULT_MODEL, help="llama2.c folder, HF folder or hub id (default: %(default)s)")
    col.add_argument("--data", default=None, help="text file or folder of *.txt (default: the shared calibration corpus, "
                     "State of the Union addresses up to 1950)")
    col.add_argument("--out", required=True, help="output folder")
    col.add_argument("--sketch", choices=["B", "A", "input"], default="B", help="default: %(default)s")
    col.add_argument("--power-iters", type=int, default=1, help="passes (B) or half-iterations (A) (default: %(default)s)")
    col.add_argument("--n-seqs", type=int, default=128, help="default: %(default)s")
    col.add_argument("--seq-len", type=int, default=512, help="default: %(default)s")
    col.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    col.add_argument("--layers", type=_layers, default=None, help="decoder layers, e.g. 0-15 or 3,7 (default: all)")
    col.add_argument("--include", default=None, help="regex: only modules whose name matches")
    col.add_argument("--exclude", default=None, help="regex: skip modules whose name matches")
    col.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default: %(default)s)")
    col.add_argument("--accum-dtype", choices=["float32", "float64"], default="float32", help="default: %(default)s")
    col.add_argument("--device", default=default_device, help="model device (default: %(default)s)")
    col.add_argument("--factor-device", default=None, help="where the factors live (default: the model's device)")
    col.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    col.add_argument("--no-resume", action="store_true", help="start over even if --out holds a run")
    col.add_argument("--checkpoint-interval", type=float, default=600.0, help="seconds between checkpoints (default: %(default)s)")
    col.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in the backward (less memory)")
    col.add_argument("--tf32", action="store_true", help="allow TF32 products on GPU")
    return parser


def _collect(args: argparse.Namespace) -> None:
    from .data import corpus_texts
    from .hessians import collect_hessians
    from .models import load_model

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if str(args.device).startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        if args.device == "cuda":
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    data = args.data if args.data is not None else corpus_texts("calibration")
    out = collect_hessians(
        model, data, args.out, tokenizer=tokenizer, sketch=args.sketch, power_iters=args.power_iters,
        n_seqs=args.n_seqs, seq_len=args.seq_len, batch_size=args.batch_size, layers=args.layers,
        include=args.include, exclude=args.exclude, accum_dtype=DTYPES[args.accum_dtype],
        factor_device=args.factor_device, seed=args.seed, resume=not args.no_resume,
        checkpoint_interval=args.checkpoint_interval, gradient_checkpointing=args.gradient_checkpointing,
        allow_tf32=args.tf32,
    )
    print(f"Hessian factors written to {out}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.model, args.data, args.n_seqs, args.seq_len, args.block_size, args.device)
    elif args.command == "collect":
        _collect(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
