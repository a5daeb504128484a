"""Collect + quantize a small real model on two devices and compare (the device check's end-to-end part).

    python3 benchmarks/device_compare.py --model device_data/stories260K --devices cpu cuda --out OUT.json

Per device: Sketch B factors from the same seeded calibration tokens, then YAQA 2-bit with RHT from the CPU's
factors (so rounding differs only by the device's kernels) and from the device's own; reported: the factors'
largest relative difference to the CPU's, the fraction of codes equal to the CPU's, the KL of each quantized
model on held-out tokens, and the seconds each step took.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from yaqa_ext import QuantConfig, collect_hessians, evaluate, load_hessians, quantize
from yaqa_ext.models import load_model, use_default_shared
from yaqa_ext.qlinear import QuantizedLinear


def _codes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.codes().cpu() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _factor_difference(a: Path, b: Path) -> float:
    """max over layers and sides of ||A - B||_F / ||A||_F."""
    fa, fb = load_hessians(a), load_hessians(b)
    worst = 0.0
    for name in fa.modules:
        for x, y in zip(fa.load(name), fb.load(name)):
            if x is not None:
                worst = max(worst, float((x.double() - y.double()).norm() / x.double().norm().clamp_min(1e-300)))
    return worst


def main() -> None:
    use_default_shared()  # the shared models and corpus: ../shared unless YAQA_SHARED is set
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stories260K")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--n-seqs", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    args = parser.parse_args()

    model, _ = load_model(args.model)
    vocab = model.get_input_embeddings().weight.size(0)
    g = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, vocab, (args.n_seqs, args.seq_len), generator=g)
    held_out = torch.randint(0, vocab, (16, args.seq_len), generator=g)
    config = QuantConfig(method="yaqa", bits=2)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        factors = {}
        for device in args.devices:
            m = copy.deepcopy(model).to(device)
            start = time.perf_counter()
            factors[device] = collect_hessians(m, calibration.to(device), Path(tmp) / device, sketch="B",
                                               n_seqs=args.n_seqs, seq_len=args.seq_len, progress=False)
            row = {"collect_seconds": time.perf_counter() - start}
            for source in dict.fromkeys([args.devices[0], device]):
                q = copy.deepcopy(model).to(device)
                start = time.perf_counter()
                quantize(q, config, hessians=factors[source], progress=False)
                row[f"quantize_seconds_{source}_factors"] = time.perf_counter() - start
                row[f"kl_{source}_factors"] = evaluate(model.to(device), q, held_out.to(device), n_seqs=16,
                                                       seq_len=args.seq_len).kl
                codes = _codes(q)
                if device == args.devices[0] and source == device:
                    reference_codes = codes
                row[f"codes_equal_{source}_factors"] = (
                    sum(int((codes[k] == reference_codes[k]).sum()) for k in codes)
                    / sum(c.numel() for c in codes.values()))
            row["factor_rel_diff_vs_first"] = _factor_difference(factors[args.devices[0]], factors[device])
            results[device] = row
            print(device, json.dumps(row, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
