"""Issue 11's learning-rate study of per-block fine-tuning on SmolLM2: only the first 4 of 30 decoder blocks are
quantized (ldlq 2-bit, RHT, the input moments of benchmarks/quality_smollm2.sh, seed 1), fine-tuned on 32 x 512
calibration tokens, and evaluated on 16 x 256 held-out tokens; one row per EPOCHS:LR argument (0 epochs first).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finetune_lr_smollm2.py 2:1e-4 2:1e-3 2:3e-3
"""

from __future__ import annotations

import copy
import sys
import time

import torch

from yaqa_ext import QuantConfig, quantize
from yaqa_ext.data import corpus_texts, prepare_tokens
from yaqa_ext.evaluation import evaluate
from yaqa_ext.hf import dequantize
from yaqa_ext.models import load_model, use_default_shared

FACTORS = "yaqa_out/quality-smollm2-hessians/input-seed1"
FIRST_FOUR = [r"layers\.([4-9]|[1-2][0-9])\."]  # skip blocks 4..29


def main(settings: list[str]) -> None:
    use_default_shared()  # the shared models and corpus: ../shared unless YAQA_SHARED is set
    model, tokenizer = load_model("smollm2-135m")
    calibration = prepare_tokens(corpus_texts("calibration"), tokenizer, 32, 512)
    held_out = prepare_tokens(corpus_texts("evaluation"), tokenizer, 16, 256)
    for epochs, lr in [(0, 1e-3)] + [(int(e), float(r)) for e, r in (s.split(":") for s in settings)]:
        q = copy.deepcopy(model)
        start = time.perf_counter()
        report = quantize(q, QuantConfig(method="ldlq", bits=2, skip=FIRST_FOUR, finetune_epochs=epochs, finetune_lr=lr),
                          hessians=FACTORS, data=calibration, n_seqs=32, seq_len=512, batch_size=4, progress=False)
        seconds = time.perf_counter() - start
        result = evaluate(model, dequantize(q), held_out, batch_size=8, n_seqs=16, seq_len=256)
        print(f"epochs {epochs} lr {lr:g}: KL {result.kl:.4f}, ppl {result.ppl_quant:.2f} ({seconds:.0f} s); block errors "
              + " ".join(f"{a:.3g}->{b:.3g}" for _, a, b in report.finetune), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
