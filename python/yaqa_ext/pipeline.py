"""The end-to-end experiment: collect factors, quantize with every method at every bit width, evaluate,
and tabulate KL, perplexity, bits/weight and time. Resumable: finished rows are kept in results.json."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

from .data import TextData, corpus_texts, prepare_tokens
from .evaluation import evaluate, reference_logits
from .fileio import atomic_write_text
from .hessians import TWO_SIDED_SKETCHES, collect_hessians
from .config import QuantConfig
from .hf import dequantize
from .lowrank import INPUT_STAT_METHODS, LOWRANK_METHODS
from .methods import pipeline_methods
from .models import load_model
from .quantize import quantize
from .report import plots_available, write_pipeline_report

__all__ = ["format_results", "parse_method", "run_pipeline"]

_POWER_ITERS = {"input": 1, "A": 2, "B": 1, "B-lw": 1}
REFERENCE_LOGITS_BUDGET = 4 << 30
"""Bytes of original-model logits the pipeline keeps in memory to evaluate every row against (else it
runs the original model again for each row)."""  # Sketch A: sum x^T x, then one H_O and one H_I half-iteration


def parse_method(name: str) -> tuple[str, str | None, int]:
    """``"yaqa-B+kl:8"`` -> ``("yaqa-B", "kl", 8)``: a pipeline method, optionally with a low-rank term."""
    base, _, lowrank = name.partition("+")
    variants = pipeline_methods()
    if base not in variants:
        raise ValueError(f"unknown method {name!r}: use one of {list(variants)}, optionally with a low-rank "
                         f"term as METHOD+LOWRANK:RANK (LOWRANK one of {LOWRANK_METHODS}), e.g. 'yaqa-B+kl:8'")
    if not lowrank:
        return base, None, 0
    kind, _, rank = lowrank.partition(":")
    if kind not in LOWRANK_METHODS or not rank.isdigit() or int(rank) < 1:
        raise ValueError(f"bad low-rank term in {name!r}: write METHOD+LOWRANK:RANK with LOWRANK one of "
                         f"{LOWRANK_METHODS} and RANK >= 1, e.g. 'yaqa-B+kl:8'")
    if kind == "kl" and variants[base][1] not in TWO_SIDED_SKETCHES:
        raise ValueError(f"{name!r}: the 'kl' low-rank term needs YAQA's two factors; use it with yaqa-A or yaqa-B")
    return base, kind, int(rank)


def _order(name: str) -> tuple[int, int, int]:
    base, kind, rank = parse_method(name)
    return list(pipeline_methods()).index(base), rank, -1 if kind is None else LOWRANK_METHODS.index(kind)


def format_results(rows: list[dict]) -> str:
    """A markdown table: one line per (bits, method), mean (and spread) over seeds."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["bits"], r["method"]), []).append(r)
    lines = ["| bits | method | KL (nats/token) | ppl | bits/weight | quantize s | seeds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (bits, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], _order(kv[0][1]))):
        kl = [r["kl"] for r in rs]
        spread = f" ± {statistics.stdev(kl):.4f}" if len(kl) > 1 else ""
        lines.append(f"| {bits} | {method} | {statistics.mean(kl):.4f}{spread} | "
                     f"{statistics.mean(r['ppl_quant'] for r in rs):.2f} | {rs[0]['bits_per_weight']:.3f} | "
                     f"{statistics.mean(r['quantize_seconds'] for r in rs):.1f} | {len(rs)} |")
    ppl = rows[0]["ppl_orig"] if rows else float("nan")
    lines.append(f"\nOriginal model perplexity: {ppl:.2f}.")
    return "\n".join(lines)


def run_settings(config: dict | None, **run: int | str | None) -> dict:
    """What makes two runs' rows comparable: the run's sizes and every QuantConfig field the methods share
    (the defaults included, so a change of default is not mixed into old results)."""
    shared = QuantConfig(**(config or {})).to_dict()
    for key in ("method", "bits", "seed", "lowrank_rank", "lowrank_method", "modules", "routed_experts"):
        shared.pop(key)
    return {**run, **shared}


def _describe(data: TextData) -> str:
    """What identifies a calibration source in saved results: its path or name (a list: a hash of its samples) and
    how it is read."""
    source = data.source
    if not isinstance(source, (str, os.PathLike)):
        source = "sha256:" + hashlib.sha256(json.dumps(data.samples(), sort_keys=True).encode()).hexdigest()[:16]
    return (f"{source} (text_field {data.text_field}, split {data.split}, config {data.config}, "
            f"chat_template {data.chat_template})")


def _differing(saved: dict, current: dict) -> list[str]:
    """The settings in which saved rows differ from this run; a QuantConfig field added since the rows were
    saved counts as equal at its default (the behaviour before it existed), and the fine-tuning learning rate
    only where fine-tuning is on."""
    defaults = QuantConfig().to_dict()

    def effective(settings: dict) -> dict:
        full = {**defaults, **settings}
        off = full["finetune_epochs"] == 0 and full.get("finetune_e2e_epochs", 0) == 0
        return {k: v for k, v in full.items() if not (k == "finetune_lr" and off)}

    saved, current = effective(saved), effective(current)
    return sorted(k for k in {**saved, **current} if saved.get(k) != current.get(k))


def _row_config(config: dict | None, method: tuple[str, str | None, int], bits: int, seed: int) -> QuantConfig:
    """The QuantConfig of one row: the run's shared fields, the method (a :func:`parse_method` triple), bits, seed."""
    base, lowrank, rank = method
    fields = {"method": pipeline_methods()[base][0], "bits": bits, "seed": seed}
    if lowrank is not None:
        fields.update(lowrank_rank=rank, lowrank_method=lowrank)
    return QuantConfig(**{**(config or {}), **fields})


def run_pipeline(
    model_name: str,
    out_dir: str | os.PathLike,
    *,
    methods: list[str] | None = None,
    bits: list[int] = [2, 3, 4],
    seeds: list[int] = [0],
    n_seqs: int = 128,
    seq_len: int = 256,
    eval_seqs: int = 64,
    eval_len: int = 256,
    batch_size: int = 8,
    device: str = "cpu",
    config: dict | None = None,
    calibration: TextData | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run (or resume) the experiment; writes ``results.json`` and ``results.md`` into ``out_dir``.

    ``methods``: experiment names of the registered methods (:func:`yaqa_ext.methods.pipeline_methods`;
    default: all), each optionally with a low-rank term (``"yaqa-B+kl:8"``, see :func:`parse_method`). ``config``: further :class:`QuantConfig` fields for
    every method (e.g. ``{"rht": False}``). ``calibration``: the calibration text (default: the shared corpus's
    State of the Union addresses to 1950); evaluation is on the shared corpus's later addresses and Moby-Dick.
    """
    methods = list(pipeline_methods()) if methods is None else methods
    parsed = {m: parse_method(m) for m in methods}
    for m in methods:  # every row's configuration is valid before any collection starts
        for b in bits:
            _row_config(config, parsed[m], b, seeds[0] if seeds else 0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    rows: list[dict] = []
    settings = run_settings(config, n_seqs=n_seqs, seq_len=seq_len, eval_seqs=eval_seqs, eval_len=eval_len,
                            batch_size=batch_size, calibration=None if calibration is None else _describe(calibration))
    if results_path.exists():
        saved = json.loads(results_path.read_text())
        changed = _differing(saved.get("settings") or {}, settings)
        if saved.get("model") != model_name or changed:
            raise FileExistsError(f"{results_path} holds results of another model or other settings (model "
                                  f"{saved.get('model')!r}, differing: {', '.join(changed) or '-'}); choose another --out")
        rows = saved["rows"]
    done = {(r["method"], r["bits"], r["seed"]) for r in rows}

    model, tokenizer = load_model(model_name, device=device)
    source = "State of the Union to 1950" if calibration is None else _describe(calibration)
    calibration = prepare_tokens(calibration or corpus_texts("calibration"), tokenizer, n_seqs, seq_len)
    evaluation = prepare_tokens(corpus_texts("evaluation"), tokenizer, eval_seqs, eval_len)
    print(f"{model_name}: {sum(p.numel() for p in model.parameters()):,} parameters on {device}; calibration "
          f"{n_seqs} x {seq_len} tokens ({source}), evaluation {eval_seqs} x {eval_len} tokens "
          "(later addresses, Moby-Dick)")

    # The original's logits on the evaluation tokens, computed once for every row when they fit the budget.
    logits_bytes = evaluation.numel() * model.get_output_embeddings().weight.size(0) * model.dtype.itemsize
    orig_logits = reference_logits(model, evaluation, batch_size, progress) if logits_bytes <= REFERENCE_LOGITS_BUDGET else None

    def factors(sketch: str, seed: int, method: str) -> Path:
        path = out / "hessians" / f"{sketch}-seed{seed}"
        start = time.perf_counter()
        collect_hessians(model, calibration, path, sketch=sketch, power_iters=_POWER_ITERS[sketch], n_seqs=n_seqs,
                         seq_len=seq_len, batch_size=batch_size, seed=seed, progress=progress)
        print(f"factors for {method} (sketch {sketch}, seed {seed}) in {path} "
              f"({time.perf_counter() - start:.1f} s, reused if already collected)")
        return path

    for seed in seeds:
        for method in methods:
            base, lowrank, _ = parsed[method]
            sketch = pipeline_methods()[base][1]
            if all((method, b, seed) in done for b in bits):
                continue
            hessians = None if sketch is None else factors(sketch, seed, method)
            moments = factors("input", seed, method) if lowrank in INPUT_STAT_METHODS else None
            for b in bits:
                if (method, b, seed) in done:
                    continue
                qmodel = copy.deepcopy(model)
                start = time.perf_counter()
                row_config = _row_config(config, parsed[method], b, seed)
                report = quantize(qmodel, row_config, hessians=hessians, input_moments=moments, progress=False,
                                  data=calibration if row_config.finetune_epochs or row_config.finetune_e2e_epochs else None, n_seqs=n_seqs,
                                  seq_len=seq_len, batch_size=batch_size)
                seconds = time.perf_counter() - start
                # Evaluated with each layer's effective weight: the function QuantizedLinear computes (up to fp32
                # rounding), at the speed of a dense layer.
                result = evaluate(model, dequantize(qmodel), evaluation, batch_size=batch_size, n_seqs=eval_seqs,
                                  seq_len=eval_len, orig_logits=orig_logits, progress=progress)
                row = {"method": method, "bits": b, "seed": seed, "kl": result.kl, "ppl_orig": result.ppl_orig,
                       "ppl_quant": result.ppl_quant, "bits_per_weight": report.bits_per_weight,
                       "quantize_seconds": seconds, "eval_tokens": result.tokens}
                rows.append(row)
                (out / "layers").mkdir(exist_ok=True)
                atomic_write_text(json.dumps(_compact(report.to_dict()["layers"])), out / "layers" / _layers_file(method, b, seed))
                print(f"  {method:7s} {b}-bit seed {seed}: KL {result.kl:.4f}, ppl {result.ppl_quant:.2f} "
                      f"(orig {result.ppl_orig:.2f}), {report.bits_per_weight:.3f} bits/weight, {seconds:.1f} s")
                atomic_write_text(json.dumps({"model": model_name, "settings": settings, "rows": rows}, indent=2),
                                  results_path)
                del qmodel
    chosen = [r for r in rows if r["method"] in methods and r["bits"] in bits and r["seed"] in seeds]
    table = format_results(chosen)
    atomic_write_text(table + "\n", out / "results.md")
    print(table)
    layer_files = {f"{r['method']} {r['bits']} {r['seed']}": out / "layers" / _layers_file(r["method"], r["bits"], r["seed"])
                   for r in chosen}
    written = write_pipeline_report(chosen, {k: json.loads(f.read_text()) for k, f in layer_files.items() if f.exists()},
                                    out)
    print("report: " + ", ".join(str(f) for f in written) + ("" if plots_available() else
                                                             " (pip install matplotlib for the plots)"))
    return rows


def _compact(layers: list[dict]) -> list[dict]:
    """A row's per-layer table as kept beside the results: each layer's name, shape and measured values, floats
    to 5 significant digits."""
    return [{k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in layer.items() if k not in ("tiles", "lowrank")}
            for layer in layers]


def _layers_file(method: str, bits: int, seed: int) -> str:
    return f"{method.replace(':', '_')}-{bits}bit-seed{seed}.json"

