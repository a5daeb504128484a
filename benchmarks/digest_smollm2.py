"""A refactoring check on the real model: SmolLM2-135M, Sketch B on decoder layers 0-1 (16 x 128 tokens), then rtn,
datafree, ldlq and yaqa at 4 bits on those layers; prints each method's KL to the original (8 x 256 held-out
tokens) and a sha256 over the quantized model's whole state dict. Run it on the code before and after a change
that should not change the results: equal digests mean bit-identical quantized models.

    .venv/bin/python benchmarks/digest_smollm2.py OUT_DIR      # writes OUT_DIR/result.json
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import torch

from yaqa_ext import QuantConfig, collect_hessians, dequantize, evaluate, quantize
from yaqa_ext.data import corpus_texts, prepare_tokens
from yaqa_ext.models import load_model, use_default_shared


def digest(model: torch.nn.Module) -> str:
    """sha256 over every state-dict entry's name and bytes."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(out: Path) -> None:
    use_default_shared()  # the shared models and corpus: ../shared unless YAQA_SHARED is set
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m")
    calibration = prepare_tokens(corpus_texts("calibration"), tok, 16, 128)
    collect_hessians(model, calibration, out / "h", sketch="B", n_seqs=16, seq_len=128, batch_size=8, layers=[0, 1],
                     progress=False)
    skip = [r"layers\.([2-9]|[12][0-9])\."]
    evaluation = prepare_tokens(corpus_texts("evaluation"), tok, 8, 256)
    results = {}
    for method in ("rtn", "datafree", "ldlq", "yaqa"):
        q = copy.deepcopy(model)
        quantize(q, QuantConfig(method=method, bits=4, skip=skip),
                 hessians=out / "h" if method in ("ldlq", "yaqa") else None, progress=False)
        results[method] = {"digest": digest(q)}
        results[method]["kl"] = evaluate(model, dequantize(q), evaluation, n_seqs=8, seq_len=256, batch_size=8).kl
        print(method, results[method], flush=True)
    (out / "result.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
