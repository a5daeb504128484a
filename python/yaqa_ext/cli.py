"""The ``yaqa`` command line."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .codebooks import CODEBOOKS
from .config import EXPERT_FALLBACKS
from .fileio import publish_files
from .lowrank import LOWRANK_METHODS
from .methods import METHODS, pipeline_methods
from .models import DEFAULT_MODEL, use_default_shared

__all__ = ["main"]

REPORT = "quantization_report.json"
REPORT_CSV, REPORT_PLOT = "quantization_report.csv", "quantization_report.png"
FINETUNE_STATE = "finetune-state"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _layers(text: str) -> list[int]:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _folder(text: str) -> str:
    """A non-empty output folder (an empty one would write into the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the folder is empty: name a folder to write into")
    return text


def _device(text: str) -> str:
    """A torch device that exists on this machine."""
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, ...): {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: yaqa_ext runs on cpu or cuda")
    return text


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression: {e}") from None
    return text


def _parser() -> argparse.ArgumentParser:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    from . import __version__

    parser = argparse.ArgumentParser(prog="yaqa", description="Model-preserving quantization of LLMs (YAQA).")
    parser.add_argument("--version", action="version",
                        version=f"yaqa_ext {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="factor a real model's layer Hessians with block_ldl")
    demo.add_argument("--model", default=DEFAULT_MODEL, help="llama2.c folder, HF folder or hub id (default: %(default)s)")
    demo.add_argument("--data", default=None, help="text file or folder (default: the shared Moby-Dick text)")
    demo.add_argument("--n-seqs", type=int, default=16, help="calibration sequences (default: %(default)s)")
    demo.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    demo.add_argument("--block-size", type=int, default=16, help="LDL block size cap (default: %(default)s)")
    demo.add_argument("--device", type=_device, default=default_device, help="default: %(default)s")

    col = sub.add_parser("collect", help="collect Kronecker-factored Hessians (Sketch A / B) or input moments",
                         description="Collect each decoder linear layer's Hessian factors into --out. Resumable: "
                         "run the same command again after an interruption. Under torchrun every rank takes "
                         "its share of the sequences.")
    col.add_argument("--model", default=DEFAULT_MODEL, help="llama2.c folder, HF folder or hub id (default: %(default)s)")
    _data_arguments(col, "the shared calibration corpus, State of the Union addresses up to 1950")
    col.add_argument("--out", type=_folder, required=True, help="output folder")
    col.add_argument("--sketch", choices=["B", "A", "input", "B-lw"], default="B",
                     help="B-lw: Sketch B plus what shrinks it toward its per-token part, for few sequences "
                     "(default: %(default)s)")
    col.add_argument("--power-iters", type=int, default=1, help="passes (B) or half-iterations (A) (default: %(default)s)")
    col.add_argument("--n-seqs", type=int, default=128, help="default: %(default)s")
    col.add_argument("--seq-len", type=int, default=512, help="default: %(default)s")
    col.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    col.add_argument("--layers", type=_layers, default=None, help="decoder layers, e.g. 0-15 or 3,7 (default: all)")
    col.add_argument("--layers-per-pass", type=int, default=None,
                     help="collect this many layers at a time, each group's factors written and freed before the "
                          "next (less memory, one forward and backward per group; default: all in one pass)")
    col.add_argument("--include", type=_regex, default=None, help="regex: only modules whose name matches")
    col.add_argument("--exclude", type=_regex, default=None, help="regex: skip modules whose name matches")
    col.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default: %(default)s)")
    col.add_argument("--accum-dtype", choices=["float32", "float64"], default="float32", help="default: %(default)s")
    col.add_argument("--device", type=_device, default=default_device, help="model device (default: %(default)s)")
    col.add_argument("--factor-device", type=_device, default=None, help="where the factors live (default: the model's device)")
    col.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    col.add_argument("--no-resume", action="store_true", help="start over even if --out holds a run")
    col.add_argument("--checkpoint-interval", type=float, default=600.0, help="seconds between checkpoints (default: %(default)s)")
    col.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in the backward (less memory)")
    col.add_argument("--tf32", action="store_true", help="allow TF32 products on GPU")

    qua = sub.add_parser("quantize", help="quantize a model and save it (loadable with from_pretrained)",
                         description="Quantize every decoder linear layer and save the model with save_pretrained; "
                         "after `import yaqa_ext`, AutoModelForCausalLM.from_pretrained(OUT) loads it.")
    qua.add_argument("--model", default=DEFAULT_MODEL, help="llama2.c folder, HF folder or hub id (default: %(default)s)")
    qua.add_argument("--out", type=_folder, required=True, help="output folder for the quantized model")
    qua.add_argument("--method", choices=list(METHODS), default="yaqa",
                     help="; ".join(f"{m.name}: {m.description}" for m in METHODS.values()) + " (default: %(default)s)")
    qua.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (default: %(default)s)")
    _quantizer_argument(qua)
    qua.add_argument("--hessians", default=None, help="folder from `yaqa collect` (default: collect from --data first)")
    _data_arguments(qua, "the shared calibration corpus; used when collecting or fine-tuning")
    qua.add_argument("--n-seqs", type=int, default=128, help="calibration sequences when collecting (default: %(default)s)")
    qua.add_argument("--seq-len", type=int, default=512, help="default: %(default)s")
    qua.add_argument("--group-size", type=int, default=None, help="input columns per scale (default: one scale per output row)")
    qua.add_argument("--asymmetric", action="store_true", help="min-max grid with zero points")
    qua.add_argument("--no-rht", action="store_true", help="no random Hadamard transform")
    qua.add_argument("--sigma-reg", type=float, default=1e-2, help="relative damping (default: %(default)s)")
    qua.add_argument("--td-x", type=int, default=2, help="tile rows (default: %(default)s)")
    qua.add_argument("--td-y", type=int, default=2, help="tile columns (default: %(default)s)")
    qua.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    qua.add_argument("--lowrank-rank", type=int, default=0, help="rank of a low-rank error correction (default: none)")
    qua.add_argument("--lowrank-method", choices=["auto", *LOWRANK_METHODS], default="auto",
                     help="auto: kl with YAQA factors, else qera-exact with input moments, else svd (default: %(default)s)")
    qua.add_argument("--input-moments", default=None,
                     help="a `yaqa collect --sketch input` folder: statistics for the lqer / qera low-rank terms")
    qua.add_argument("--datafree-transform", action="store_true",
                     help="datafree: also search an input-column scaling for layers without a partner")
    qua.add_argument("--skip", type=_regex, action="append", default=[], help="regex of module names to keep unquantized (repeatable)")
    qua.add_argument("--expert-min-tokens", type=int, default=16,
                     help="MoE: an expert's matrix that saw fewer routed calibration tokens uses --expert-fallback "
                          "(default: %(default)s)")
    qua.add_argument("--expert-fallback", choices=EXPERT_FALLBACKS, default="shared",
                     help="shared: the sum of that matrix's factors over the layer's experts; rtn: round to nearest "
                          "(default: %(default)s)")
    _rounding_arguments(qua)
    qua.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default: %(default)s)")
    qua.add_argument("--device", type=_device, default=default_device, help="default: %(default)s")

    ev = sub.add_parser("eval", help="KL(original || quantized) and perplexities on held-out text")
    ev.add_argument("--model", default=DEFAULT_MODEL, help="the original model (default: %(default)s)")
    ev.add_argument("--quant", required=True, help="the quantized model's folder (from `yaqa quantize`)")
    _data_arguments(ev, "the shared evaluation corpus")
    ev.add_argument("--n-seqs", type=int, default=64, help="default: %(default)s")
    ev.add_argument("--seq-len", type=int, default=256, help="default: %(default)s")
    ev.add_argument("--device", type=_device, default=default_device, help="default: %(default)s")
    ev.add_argument("--tasks", default=None,
                    help="also run these lm-evaluation-harness tasks (comma-separated, e.g. hellaswag,arc_easy) on "
                         "both models; needs `pip install lm_eval`")
    ev.add_argument("--include-path", default=None, help="a folder of lm_eval task YAML files (local tasks)")
    ev.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if below 1)")

    exp = sub.add_parser("export", help="write a quantized model in a format serving engines load",
                         description="Write a `yaqa quantize` folder in the compressed-tensors pack-quantized layout "
                         "(vLLM, SGLang, transformers with the compressed-tensors package). Exports INT-grid layers "
                         "without RHT, low-rank terms or fine-tuned channel scales: quantize with --asymmetric "
                         "--no-rht (symmetric grids need --widen-symmetric: one more bit).")
    exp.add_argument("--quant", required=True, help="the quantized model's folder (from `yaqa quantize`)")
    exp.add_argument("--out", type=_folder, required=True, help="a new folder for the exported model")
    exp.add_argument("--format", choices=["compressed-tensors"], default="compressed-tensors",
                     help="default: %(default)s")
    exp.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                     help="scales and unquantized weights (default: %(default)s)")
    exp.add_argument("--widen-symmetric", action="store_true",
                     help="export symmetric (midrise) b-bit grids exactly as symmetric (b + 1)-bit integers")

    run = sub.add_parser("run", help="the whole pipeline on a model: collect, quantize (rtn / ldlq / yaqa-A / "
                         "yaqa-B at 2, 3, 4 bits), evaluate, print the table",
                         description="Collect factors, quantize with every method and bit width, evaluate KL and "
                         "perplexity on held-out text. Resumable: finished rows are kept in OUT/results.json.")
    run.add_argument("--model", default=DEFAULT_MODEL, help="llama2.c folder, HF folder or hub id (default: %(default)s)")
    run.add_argument("--out", type=_folder, default=None, help="work folder (default: yaqa_out/<model name>)")
    run.add_argument("--methods", nargs="+", default=list(pipeline_methods()),
                     help="each optionally with a low-rank term, e.g. yaqa-B+kl:8 or yaqa-B+qera-exact:32 "
                          "(default: %(default)s)")
    run.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4], help="default: %(default)s")
    run.add_argument("--seeds", nargs="+", type=int, default=[0], help="default: %(default)s")
    run.add_argument("--n-seqs", type=int, default=128, help="calibration sequences (default: %(default)s)")
    run.add_argument("--seq-len", type=int, default=256, help="default: %(default)s")
    run.add_argument("--eval-seqs", type=int, default=64, help="default: %(default)s")
    run.add_argument("--eval-len", type=int, default=256, help="default: %(default)s")
    _data_arguments(run, "the shared calibration corpus; evaluation is always on the shared evaluation corpus")
    run.add_argument("--no-rht", action="store_true", help="quantize without the random Hadamard transform")
    run.add_argument("--tile", type=int, default=None, help="td_x = td_y (default: QuantConfig's, 2)")
    run.add_argument("--scale", choices=["channel", "tensor"], default="channel", help="grid scale (default: %(default)s)")
    run.add_argument("--skip", type=_regex, action="append", default=[],
                     help="regex of module names to keep unquantized in every row (repeatable), e.g. to compare "
                          "codebooks on the matrices all of them can code")
    _quantizer_argument(run)
    run.add_argument("--device", type=_device, default=default_device, help="default: %(default)s")
    _rounding_arguments(run)
    return parser


def _data_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--data", default=None,
                        help=f"text file, folder of *.txt, JSON Lines / JSON file, or a Hugging Face dataset name "
                             f"(needs `datasets`) (default: {default})")
    parser.add_argument("--text-field", default="text",
                        help="the records' field (or dataset column) holding the text or conversation (default: %(default)s)")
    parser.add_argument("--split", default="train", help="a named dataset's split (default: %(default)s)")
    parser.add_argument("--dataset-config", default=None, help="a named dataset's configuration")
    parser.add_argument("--chat-template", action="store_true",
                        help="put each text (as a user turn) and conversation through the tokenizer's chat template")


def _text_data(args: argparse.Namespace, split: str):
    """The --data options as a TextData, or the shared corpus's ``split`` when no --data is given."""
    from .data import TextData, corpus_texts

    if args.data is None:
        return TextData(corpus_texts(split), chat_template=args.chat_template)
    return TextData(args.data, args.text_field, args.split, args.dataset_config, args.chat_template)


def _quantizer_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantizer", choices=sorted(CODEBOOKS), default="int",
                        help="codebook: int (scalar grid, 2/3/4/8 bits), e8p (E8 lattice, 8 weights per code; 3 and 4 "
                             "bits add a residual stage) or trellis (bitshift trellis codes over 16 x 16 units, "
                             "1-4 bits; slowest to encode, least error) (default: %(default)s)")


def _rounding_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounding-scale-search", action="store_true",
                        help="round with the grid's scales times 0.9 .. 1.3 and keep the least proxy loss (~5x rounding time)")
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="fine-tune each decoder block after each group of its layers is rounded, this many "
                             "epochs over the calibration activations (default: %(default)s, off)")
    parser.add_argument("--finetune-lr", type=float, default=1e-3, help="Adam's learning rate (default: %(default)s)")
    parser.add_argument("--finetune-e2e-epochs", type=int, default=0,
                        help="then train the quantized model's norms and channel scales against the original's "
                             "output distribution (KL), this many epochs (default: %(default)s, off)")


def _collect(args: argparse.Namespace) -> None:
    from .hessians import collect_hessians, load_hessians
    from .models import load_model

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if str(args.device).startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        if args.device == "cuda":
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    data = _text_data(args, "calibration")
    out = collect_hessians(
        model, data, args.out, tokenizer=tokenizer, sketch=args.sketch, power_iters=args.power_iters,
        n_seqs=args.n_seqs, seq_len=args.seq_len, batch_size=args.batch_size, layers=args.layers,
        layers_per_pass=args.layers_per_pass, include=args.include, exclude=args.exclude, accum_dtype=DTYPES[args.accum_dtype],
        factor_device=args.factor_device, seed=args.seed, resume=not args.no_resume,
        checkpoint_interval=args.checkpoint_interval, gradient_checkpointing=args.gradient_checkpointing,
        allow_tf32=args.tf32,
    )
    print(f"Hessian factors written to {out}")
    experts = load_hessians(out).expert_tokens()
    if experts:
        counts = sorted(experts.values())
        fewest = min(experts, key=experts.get)
        print(f"MoE experts: {len(counts)} matrices saw {counts[0]} to {counts[-1]} routed tokens (median "
              f"{counts[len(counts) // 2]}; fewest: {fewest}); `yaqa quantize` rounds those under --expert-min-tokens "
              "with the --expert-fallback rule")


def _quantize(args: argparse.Namespace) -> None:
    from .config import QuantConfig
    from .models import load_model
    from .quantize import quantize
    from .report import layers_csv, plot_layer_proxies, plots_available

    config = QuantConfig(method=args.method, bits=args.bits, quantizer=args.quantizer, group_size=args.group_size, symmetric=not args.asymmetric,
                         rht=not args.no_rht, sigma_reg=args.sigma_reg, td_x=args.td_x, td_y=args.td_y, seed=args.seed,
                         skip=args.skip, lowrank_rank=args.lowrank_rank, lowrank_method=args.lowrank_method,
                         datafree_transform=args.datafree_transform, finetune_epochs=args.finetune_epochs,
                         finetune_lr=args.finetune_lr, finetune_e2e_epochs=args.finetune_e2e_epochs,
                         rounding_scale_search=args.rounding_scale_search, expert_min_tokens=args.expert_min_tokens,
                         expert_fallback=args.expert_fallback)
    out = Path(args.out)
    stale = _previous_output(out)
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    needs_data = ((METHODS[args.method].needs_data and not args.hessians) or args.finetune_epochs > 0
                  or args.finetune_e2e_epochs > 0)
    data = _text_data(args, "calibration") if needs_data else None
    collect_dir = out / "hessians"  # a killed run resumes its collection from here
    blocks_dir = out / FINETUNE_STATE  # and its fine-tuned blocks from here
    report = quantize(model, config, hessians=args.hessians, data=data, input_moments=args.input_moments,
                      tokenizer=tokenizer, n_seqs=args.n_seqs, seq_len=args.seq_len, collect_dir=collect_dir,
                      checkpoint_dir=blocks_dir if args.finetune_epochs else None)
    print(report.table())
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".model-", suffix=".tmp", dir=out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        report.save(os.path.join(tmp, REPORT))
        layers_csv(report.to_dict()["layers"], os.path.join(tmp, REPORT_CSV))
        if plots_available():
            plot_layer_proxies({config.summary(): report.to_dict()["layers"]}, os.path.join(tmp, REPORT_PLOT))
        written = {f.name for f in Path(tmp).iterdir()}
        for f in stale - written:  # the previous model's files that this one does not overwrite
            (out / f).unlink()
        publish_files(tmp, out, last="config.json")
    shutil.rmtree(blocks_dir, ignore_errors=True)  # the saved model holds all of it
    kept = f"; calibration factors kept in {collect_dir}" if collect_dir.exists() else ""
    print(f"quantized model saved to {out} ({report.bits_per_weight:.3f} bits/weight){kept}")


def _previous_output(out: Path) -> set[str]:
    """The files of an earlier ``yaqa quantize`` in ``out`` (replaced by this run); refuses any other non-empty
    folder, whose files are not ours to overwrite."""
    if not out.exists():
        return set()
    if not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; name a folder")
    for leftover in out.glob(".model-*.tmp"):  # a killed run's unpublished model
        shutil.rmtree(leftover, ignore_errors=True)
    entries = {f.name for f in out.iterdir()}
    if entries and REPORT not in entries and not entries <= {"hessians", FINETUNE_STATE}:
        raise FileExistsError(f"--out {out} holds files that are not a yaqa quantize output; choose an empty or new folder")
    return {f for f in entries if (out / f).is_file()}


def _eval(args: argparse.Namespace) -> None:
    from .evaluation import evaluate
    from .hf import dequantize
    from .models import load_model

    orig, tokenizer = load_model(args.model, device=args.device)
    quant, _ = load_model(args.quant, device=args.device, with_tokenizer=False)  # the original's tokenizer is used
    data = _text_data(args, "evaluation")
    # The dense twin computes the same function as the quantized layers (to fp32 rounding), faster.
    r = evaluate(orig, dequantize(quant), data, tokenizer=tokenizer, n_seqs=args.n_seqs, seq_len=args.seq_len)
    print(f"KL(orig || quant) = {r.kl:.5f} nats/token over {r.tokens} tokens; perplexity {r.ppl_orig:.3f} (original) "
          f"-> {r.ppl_quant:.3f} (quantized)")
    if args.tasks:
        from .evaluation import lm_eval_tasks

        limit = None if args.limit is None else int(args.limit) if args.limit >= 1 else args.limit
        results = lm_eval_tasks({"original": orig, "quantized": quant}, tokenizer, args.tasks.split(","),
                                include_path=args.include_path, limit=limit)
        print(f"{'task':24s} {'metric':24s} {'original':>12s} {'quantized':>12s}")
        for task, metrics in results["original"].items():
            for metric, value in metrics.items():
                if isinstance(value, (int, float)) and "stderr" not in metric:
                    print(f"{task:24s} {metric:24s} {value:12.5g} {results['quantized'][task][metric]:12.5g}")


def _export(args: argparse.Namespace) -> None:
    from .export import export_compressed_tensors
    from .models import load_model

    model, _ = load_model(args.quant, with_tokenizer=False)
    folder = Path(args.quant)
    tokenizer = None
    if folder.is_dir() and any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    out = export_compressed_tensors(model, args.out, tokenizer=tokenizer, dtype=DTYPES[args.dtype],
                                    widen_symmetric=args.widen_symmetric)
    print(f"{args.format} model written to {out}{'' if tokenizer else ' (no tokenizer in --quant: copy one beside it)'}; "
          f"serve it with e.g. `vllm serve {out}`")


def main(argv: list[str] | None = None) -> int:
    use_default_shared()  # the demo models and corpus: ../shared unless YAQA_SHARED says otherwise
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        _dispatch(args)
    except KeyboardInterrupt:
        parser.exit(130, f"yaqa {args.command}: interrupted; run the same command again to resume\n")
    except Exception as error:  # a bad argument, file or model: one line, no traceback
        if os.environ.get("YAQA_DEBUG"):
            raise
        kind = "" if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: "
        parser.exit(2, f"yaqa {args.command}: error: {kind}{error} (YAQA_DEBUG=1 shows the traceback)\n")
    return 0


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.model, args.data, args.n_seqs, args.seq_len, args.block_size, args.device)
    elif args.command == "collect":
        _collect(args)
    elif args.command == "quantize":
        _quantize(args)
    elif args.command == "eval":
        _eval(args)
    elif args.command == "export":
        _export(args)
    elif args.command == "run":
        from .pipeline import run_pipeline

        out = args.out or os.path.join("yaqa_out", Path(args.model).name)
        config = {"rht": False} if args.no_rht else {}
        if args.scale != "channel":
            config["scale"] = args.scale
        if args.quantizer != "int":
            config["quantizer"] = args.quantizer
        if args.tile is not None:
            config["td_x"] = config["td_y"] = args.tile
        if args.skip:
            config["skip"] = args.skip
        if args.finetune_epochs or args.finetune_e2e_epochs:
            config.update(finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                          finetune_e2e_epochs=args.finetune_e2e_epochs)
        if args.rounding_scale_search:
            config["rounding_scale_search"] = True
        run_pipeline(args.model, out, methods=args.methods, bits=args.bits, seeds=args.seeds, n_seqs=args.n_seqs,
                     seq_len=args.seq_len, eval_seqs=args.eval_seqs, eval_len=args.eval_len, device=args.device,
                     config=config,
                     calibration=_text_data(args, "calibration") if args.data is not None or args.chat_template else None)


if __name__ == "__main__":
    sys.exit(main())
