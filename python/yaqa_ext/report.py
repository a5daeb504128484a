"""Reports worth reading: the per-layer table of a quantization and the rows of a pipeline run as CSV, and PNG plots
(per-layer relative proxy error by method, KL against bits by method) when matplotlib is installed
(``pip install yaqa_ext[plots]``)."""

from __future__ import annotations

import csv
import io
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from .fileio import atomic_write_bytes, atomic_write_text

__all__ = ["LAYER_COLUMNS", "layers_csv", "plot_kl_vs_bits", "plot_layer_proxies", "plots_available", "rows_csv",
           "write_pipeline_report"]

LAYER_COLUMNS = ("name", "out_features", "in_features", "damp_in", "damp_out", "proxy_one_sided", "proxy_two_sided",
                 "lowrank", "bits_per_weight", "seconds", "tokens", "fallback")
"""The columns of :func:`layers_csv`: a layer's shape, the damping its factors needed, its relative proxy errors
(``tr(dW H_I dW^T [H_O]) / tr(W H_I W^T [H_O])``), its low-rank term, stored bits and rounding time."""


def _csv(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    return out.getvalue()


def layers_csv(layers: Sequence[Mapping], path: str | os.PathLike) -> None:
    """A quantization's per-layer table (``QuantReport.to_dict()["layers"]``) as CSV, one layer a line."""
    rows = [[layer["name"], *layer["shape"], *(layer.get(k) for k in LAYER_COLUMNS[3:])] for layer in layers]
    atomic_write_text(_csv(LAYER_COLUMNS, rows), path)


def rows_csv(rows: Sequence[Mapping], path: str | os.PathLike) -> None:
    """A pipeline run's rows (method, bits, seed, KL, perplexities, bits per weight, time) as CSV."""
    columns = ("method", "bits", "seed", "kl", "ppl_orig", "ppl_quant", "bits_per_weight", "quantize_seconds")
    atomic_write_text(_csv(columns, [[r.get(c) for c in columns] for r in rows]), path)


def plots_available() -> bool:
    """Whether matplotlib is installed (the plots are optional)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _axes(size: tuple[float, float]):
    """A figure and its axes, drawn without a display."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, path: str | os.PathLike) -> None:
    """Log-scale y, the labels, title and legend, then the figure as a PNG file (atomically) and closed."""
    import matplotlib.pyplot as plt

    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(buffer.getvalue(), path)


def plot_layer_proxies(by_method: Mapping[str, Sequence[Mapping]], path: str | os.PathLike, title: str = "") -> None:
    """Each layer's relative proxy error (two-sided where the method had both factors, else one-sided; log scale)
    in model order, one line per method: ``by_method`` maps a label to its per-layer table."""
    fig, ax = _axes((10, 4.5))
    for label, layers in by_method.items():
        values = [layer.get("proxy_one_sided") if layer.get("proxy_two_sided") is None else layer["proxy_two_sided"]
                  for layer in layers]
        ax.plot(range(len(values)), [float("nan") if v is None else v for v in values], label=label, linewidth=1)
    _finish(fig, ax, "layer (model order)", "relative proxy error",
            title or "per-layer proxy error: tr(dW H_I dW^T H_O) / tr(W H_I W^T H_O)", path)


def plot_kl_vs_bits(rows: Sequence[Mapping], path: str | os.PathLike, title: str = "") -> None:
    """KL to the original against bits per weight, one line per method (mean over seeds; log scale)."""
    fig, ax = _axes((6, 4.5))
    for method in sorted({r["method"] for r in rows}):
        points: dict[int, list[Mapping]] = {}
        for r in rows:
            if r["method"] == method:
                points.setdefault(r["bits"], []).append(r)
        xs = sorted(points)
        ax.plot([statistics.mean(r["bits_per_weight"] for r in points[b]) for b in xs],
                [statistics.mean(r["kl"] for r in points[b]) for b in xs], marker="o", label=method)
    _finish(fig, ax, "bits per weight", "KL(original || quantized), nats/token", title or "KL against bits", path)


def write_pipeline_report(rows: Sequence[Mapping], reports: Mapping[str, Sequence[Mapping]], out: Path) -> list[Path]:
    """``results.csv``, and with matplotlib ``kl_vs_bits.png`` and ``proxy_by_layer-<bits>bit.png`` (the first
    seed's per-layer tables, ``reports``: 'method bits seed' -> layers), in ``out``; the files written."""
    written = [out / "results.csv"]
    rows_csv(rows, written[0])
    if not plots_available() or not rows:
        return written
    written.append(out / "kl_vs_bits.png")
    plot_kl_vs_bits(rows, written[-1])
    seed = min(r["seed"] for r in rows)
    for bits in sorted({r["bits"] for r in rows}):
        by_method = {r["method"]: reports[f"{r['method']} {bits} {seed}"] for r in rows
                     if r["bits"] == bits and r["seed"] == seed and f"{r['method']} {bits} {seed}" in reports}
        if by_method:
            written.append(out / f"proxy_by_layer-{bits}bit.png")
            plot_layer_proxies(by_method, written[-1], f"per-layer proxy error, {bits} bits, seed {seed}")
    return written
