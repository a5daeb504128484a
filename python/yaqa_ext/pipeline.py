"""The end-to-end experiment: collect factors, quantize with every method at every bit width, evaluate,
and tabulate KL, perplexity, bits/weight and time. Resumable: finished rows are kept in results.json."""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path

from .data import corpus_texts, prepare_tokens
from .evaluation import evaluate
from .hessians import _atomic_write_text, collect_hessians
from .hf import QuantConfig
from .models import load_model
from .quantize import quantize

__all__ = ["PIPELINE_METHODS", "format_results", "run_pipeline"]

# name -> (QuantConfig.method, sketch of the factors it uses)
PIPELINE_METHODS = {"rtn": ("rtn", None), "ldlq": ("ldlq", "input"), "yaqa-A": ("yaqa", "A"), "yaqa-B": ("yaqa", "B")}
_POWER_ITERS = {"input": 1, "A": 2, "B": 1}  # Sketch A: sum x^T x, then one H_O and one H_I half-iteration


def format_results(rows: list[dict]) -> str:
    """A markdown table: one line per (bits, method), mean (and spread) over seeds."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["bits"], r["method"]), []).append(r)
    order = list(PIPELINE_METHODS)
    lines = ["| bits | method | KL (nats/token) | ppl | bits/weight | quantize s | seeds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (bits, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))):
        kl = [r["kl"] for r in rs]
        spread = f" ± {statistics.stdev(kl):.4f}" if len(kl) > 1 else ""
        lines.append(f"| {bits} | {method} | {statistics.mean(kl):.4f}{spread} | "
                     f"{statistics.mean(r['ppl_quant'] for r in rs):.2f} | {rs[0]['bits_per_weight']:.3f} | "
                     f"{statistics.mean(r['quantize_seconds'] for r in rs):.1f} | {len(rs)} |")
    ppl = rows[0]["ppl_orig"] if rows else float("nan")
    lines.append(f"\nOriginal model perplexity: {ppl:.2f}.")
    return "\n".join(lines)


def run_pipeline(
    model_name: str,
    out_dir: str | os.PathLike,
    *,
    methods: list[str] = list(PIPELINE_METHODS),
    bits: list[int] = [2, 3, 4],
    seeds: list[int] = [0],
    n_seqs: int = 128,
    seq_len: int = 256,
    eval_seqs: int = 64,
    eval_len: int = 256,
    batch_size: int = 8,
    device: str = "cpu",
    config: dict | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run (or resume) the experiment; writes ``results.json`` and ``results.md`` into ``out_dir``.

    ``config``: further :class:`QuantConfig` fields for every method (e.g. ``{"rht": False}``).
    """
    unknown = [m for m in methods if m not in PIPELINE_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(PIPELINE_METHODS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    rows: list[dict] = []
    if results_path.exists():
        saved = json.loads(results_path.read_text())
        if saved.get("model") != model_name or saved.get("config", {}) != (config or {}):
            raise FileExistsError(f"{results_path} holds results of another model or configuration; choose another --out")
        rows = saved["rows"]
    done = {(r["method"], r["bits"], r["seed"]) for r in rows}

    model, tokenizer = load_model(model_name, device=device)
    calibration = prepare_tokens(corpus_texts("calibration"), tokenizer, n_seqs, seq_len)
    evaluation = prepare_tokens(corpus_texts("evaluation"), tokenizer, eval_seqs, eval_len)
    print(f"{model_name}: {sum(p.numel() for p in model.parameters()):,} parameters on {device}; calibration "
          f"{n_seqs} x {seq_len} tokens (State of the Union to 1950), evaluation {eval_seqs} x {eval_len} tokens "
          "(later addresses, Moby-Dick)")
    for seed in seeds:
        for method in methods:
            qmethod, sketch = PIPELINE_METHODS[method]
            hessians = None
            if sketch is not None and any((method, b, seed) not in done for b in bits):
                hessians = out / "hessians" / f"{sketch}-seed{seed}"
                start = time.perf_counter()
                collect_hessians(model, calibration, hessians, sketch=sketch, power_iters=_POWER_ITERS[sketch],
                                 n_seqs=n_seqs, seq_len=seq_len, batch_size=batch_size, seed=seed, progress=progress)
                print(f"factors for {method} (sketch {sketch}, seed {seed}) in {hessians} "
                      f"({time.perf_counter() - start:.1f} s, reused if already collected)")
            for b in bits:
                if (method, b, seed) in done:
                    continue
                qmodel = copy.deepcopy(model)
                start = time.perf_counter()
                qconfig = QuantConfig(**{**(config or {}), "method": qmethod, "bits": b, "seed": seed})
                report = quantize(qmodel, qconfig, hessians=hessians, progress=False)
                seconds = time.perf_counter() - start
                result = evaluate(model, qmodel, evaluation, batch_size=batch_size, n_seqs=eval_seqs, seq_len=eval_len)
                row = {"method": method, "bits": b, "seed": seed, "kl": result.kl, "ppl_orig": result.ppl_orig,
                       "ppl_quant": result.ppl_quant, "bits_per_weight": report.bits_per_weight,
                       "quantize_seconds": seconds, "eval_tokens": result.tokens}
                rows.append(row)
                print(f"  {method:7s} {b}-bit seed {seed}: KL {result.kl:.4f}, ppl {result.ppl_quant:.2f} "
                      f"(orig {result.ppl_orig:.2f}), {report.bits_per_weight:.3f} bits/weight, {seconds:.1f} s")
                _atomic_write_text(json.dumps({"model": model_name, "config": config or {}, "rows": rows}, indent=2),
                                   results_path)
                del qmodel
    table = format_results([r for r in rows if r["method"] in methods and r["bits"] in bits and r["seed"] in seeds])
    _atomic_write_text(table + "\n", out / "results.md")
    print(table)
    return rows

