"""The ``yaqa`` command line."""

from __future__ import annotations

import argparse
import sys

import torch

from .models import DEFAULT_MODEL

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yaqa", description="Model-preserving quantization of LLMs (YAQA).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="factor a real model's layer Hessians with block_ldl")
    demo.add_argument("--model", default=DEFAULT_MODEL, help="llama2.c folder, HF folder or hub id (default: %(default)s)")
    demo.add_argument("--data", default=None, help="text file or folder (default: the shared Moby-Dick text)")
    demo.add_argument("--n-seqs", type=int, default=16, help="calibration sequences (default: %(default)s)")
    demo.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    demo.add_argument("--block-size", type=int, default=16, help="LDL block size cap (default: %(default)s)")
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: %(default)s")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 0
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.model, args.data, args.n_seqs, args.seq_len, args.block_size, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
