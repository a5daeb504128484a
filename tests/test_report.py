"""Reports: the per-layer table and pipeline rows as CSV, read back with the csv module and compared with the
report they came from; the plots written as real PNG images (matplotlib, a test dependency) by the library, the
quantize command and the pipeline."""

from __future__ import annotations

import csv
import json

from conftest import tiny_model

from yaqa_ext import QuantConfig, quantize
from yaqa_ext.cli import main
from yaqa_ext.report import LAYER_COLUMNS, layers_csv, plot_kl_vs_bits, plot_layer_proxies, rows_csv

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG file's IHDR chunk, after checking its signature."""
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR", path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_layer_table_round_trips_through_csv(tmp_path):
    report = quantize(tiny_model("llama"), QuantConfig(method="rtn", bits=3), progress=False)
    layers = report.to_dict()["layers"]
    layers_csv(layers, tmp_path / "layers.csv")
    with open(tmp_path / "layers.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert tuple(read[0]) == LAYER_COLUMNS and len(read) == len(report.layers) == 14
    for row, layer in zip(read, report.layers):
        assert row["name"] == layer.name and (int(row["out_features"]), int(row["in_features"])) == layer.shape
        assert float(row["bits_per_weight"]) == layer.bits_per_weight and float(row["seconds"]) == layer.seconds
        assert row["proxy_two_sided"] == "" and layer.proxy_two_sided is None  # rtn has no factors


def test_rows_csv_and_plots(tmp_path):
    rows = [{"method": m, "bits": b, "seed": s, "kl": kl * (1 + s), "ppl_orig": 10.0, "ppl_quant": 11.0,
             "bits_per_weight": b + 0.03, "quantize_seconds": 1.5}
            for m, kl in (("rtn", 1.0), ("yaqa-B", 0.5)) for b in (2, 3, 4) for s in (0, 1)]
    rows_csv(rows, tmp_path / "rows.csv")
    with open(tmp_path / "rows.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert [(r["method"], int(r["bits"]), int(r["seed"]), float(r["kl"])) for r in read] == \
        [(r["method"], r["bits"], r["seed"], r["kl"]) for r in rows]
    plot_kl_vs_bits(rows, tmp_path / "kl.png")
    layers = [{"proxy_one_sided": 0.1 * (i + 1), "proxy_two_sided": None} for i in range(20)]
    plot_layer_proxies({"ldlq": layers, "yaqa": [{**x, "proxy_two_sided": x["proxy_one_sided"] / 2} for x in layers]},
                       tmp_path / "layers.png")
    for name in ("kl.png", "layers.png"):
        width, height = png_size(tmp_path / name)
        assert width > 300 and height > 200, (name, width, height)


def test_quantize_command_and_pipeline_write_their_reports(shared, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", "--method", "rtn", "--bits", "4", "--out", str(out), "--device", "cpu"]) == 0
    layers = json.loads((out / "quantization_report.json").read_text())["layers"]
    with open(out / "quantization_report.csv", newline="") as f:
        assert [r["name"] for r in csv.DictReader(f)] == [x["name"] for x in layers]
    png_size(out / "quantization_report.png")
    run = tmp_path / "run"
    assert main(["run", "--out", str(run), "--methods", "rtn", "ldlq", "--bits", "3", "4", "--n-seqs", "8",
                 "--seq-len", "64", "--eval-seqs", "4", "--eval-len", "64", "--device", "cpu"]) == 0
    results = json.loads((run / "results.json").read_text())["rows"]
    with open(run / "results.csv", newline="") as f:
        assert [(r["method"], int(r["bits"])) for r in csv.DictReader(f)] == [(r["method"], r["bits"]) for r in results]
    for name in ("kl_vs_bits.png", "proxy_by_layer-3bit.png", "proxy_by_layer-4bit.png"):
        png_size(run / name)
    assert len(json.loads((run / "layers" / "ldlq-4bit-seed0.json").read_text())) == 35

