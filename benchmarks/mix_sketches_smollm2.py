"""Issue 11: Sketch A / Sketch B mixtures on SmolLM2-135M. Each factor is the weighted mean of the two collections'
factors, each first normalised by its mean diagonal (the scale the rounding works in):

    H_mix = w H_A / mean(diag H_A) + (1 - w) H_B / mean(diag H_B)          (H_in and H_out alike)

Sketch A treats tokens as independent (a biased Fisher, estimated from every token); Sketch B keeps the
cross-token terms but draws one sample per sequence (unbiased, noisy): the mixture is a fixed-weight shrinkage of
B toward A. Reads the seed's A and B collections of benchmarks/quality_smollm2.sh (128 x 512 tokens), writes the
mixed collection beside them, quantizes with yaqa (RHT, int grid, as that script) and evaluates on the same 64 x 256
tokens. Resumable: rows in $OUT/results.json (default benchmarks/results/shrinkage-smollm2/mix).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/mix_sketches_smollm2.py --seed 0 --weights 0.5 --bits 3 4 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open

from yaqa_ext import QuantConfig, quantize
from yaqa_ext.data import corpus_texts, prepare_tokens
from yaqa_ext.evaluation import evaluate, reference_logits
from yaqa_ext.fileio import atomic_save, atomic_write_text
from yaqa_ext.hessians import MANIFEST, load_hessians
from yaqa_ext.hf import dequantize
from yaqa_ext.models import load_model, use_default_shared

HESSIANS = Path(os.environ.get("HESSIANS", "yaqa_out/quality-smollm2-hessians"))
FACTOR_KEYS = ("H_in", "H_out")


def mixed(H_a: torch.Tensor, H_b: torch.Tensor, w: float) -> torch.Tensor:
    """``w H_a / mean diag + (1 - w) H_b / mean diag``, in the collections' dtype."""
    return w * H_a / H_a.diagonal().mean() + (1 - w) * H_b / H_b.diagonal().mean()


def mix_collection(a_dir: Path, b_dir: Path, w: float, out: Path) -> Path:
    """A collection folder whose factors mix those of ``a_dir`` (weight w) and ``b_dir``; kept if complete."""
    if (out / MANIFEST).exists():
        return out
    a, b = load_hessians(a_dir), load_hessians(b_dir)
    if set(a.modules) != set(b.modules):
        raise ValueError(f"{a_dir} and {b_dir} hold factors of different modules")
    out.mkdir(parents=True, exist_ok=True)
    for file in sorted({info["file"] for info in b.manifest["module_info"].values()}):
        with safe_open(str(a_dir / file), "pt") as fa, safe_open(str(b_dir / file), "pt") as fb:
            tensors = {k: fb.get_tensor(k) for k in fb.keys()}
            for key in list(tensors):
                if key.rsplit(".", 1)[1] in FACTOR_KEYS:
                    tensors[key] = mixed(fa.get_tensor(key), tensors[key], w)
        atomic_save(tensors, out / file)
    manifest = dict(b.manifest, mixture={"A": str(a_dir), "B": str(b_dir), "weight_A": w})
    atomic_write_text(json.dumps(manifest, indent=2), out / MANIFEST)  # last: marks the folder complete
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.5], help="w, the weight of Sketch A")
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4, 2])
    parser.add_argument("--out", default="benchmarks/results/shrinkage-smollm2/mix")
    args = parser.parse_args()
    use_default_shared()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    rows = json.loads(results.read_text())["rows"] if results.exists() else []
    done = {(r["method"], r["bits"], r["seed"]) for r in rows}

    model, tokenizer = load_model("smollm2-135m")
    evaluation = prepare_tokens(corpus_texts("evaluation"), tokenizer, 64, 256)
    orig_logits = reference_logits(model, evaluation, 8)
    for w in args.weights:
        method = f"yaqa-A{w:g}B"
        factors = mix_collection(HESSIANS / f"A-seed{args.seed}", HESSIANS / f"B-seed{args.seed}", w,
                                 HESSIANS / f"mixA{w:g}B-seed{args.seed}")
        for bits in args.bits:
            if (method, bits, args.seed) in done:
                continue
            q = copy.deepcopy(model)
            start = time.perf_counter()
            report = quantize(q, QuantConfig(method="yaqa", bits=bits, seed=args.seed), hessians=factors, progress=False)
            seconds = time.perf_counter() - start
            result = evaluate(model, dequantize(q), evaluation, batch_size=8, n_seqs=64, seq_len=256,
                              orig_logits=orig_logits)
            rows.append({"method": method, "bits": bits, "seed": args.seed, "kl": result.kl, "ppl_orig": result.ppl_orig,
                         "ppl_quant": result.ppl_quant, "bits_per_weight": report.bits_per_weight,
                         "quantize_seconds": seconds, "eval_tokens": result.tokens})
            print(f"{method} {bits}-bit seed {args.seed}: KL {result.kl:.4f}, ppl {result.ppl_quant:.2f}", flush=True)
            atomic_write_text(json.dumps({"model": "smollm2-135m", "rows": rows}, indent=2), results)


if __name__ == "__main__":
    main()
