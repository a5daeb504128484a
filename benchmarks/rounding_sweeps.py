"""Issue 11's rounding sweeps on SmolLM2: the relative proxy loss tr(dW H_I dW^T H_O) / tr(W H_I W^T H_O) of
2-bit LDLQ (input moments, H_O = I) and YAQA (Sketch B) on the layers of two decoder blocks, as the grid's
scales are multiplied by a factor (the scale round-to-nearest fits is 1.0) and as the damping sigma_reg
varies (the default is 1e-2). Reads the factor files of benchmarks/quality_smollm2.sh (seed 1).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rounding_sweeps.py [HESSIANS_DIR]
"""

from __future__ import annotations

import sys

import torch

from yaqa_ext.codebooks import IntCodebook
from yaqa_ext.hadamard import RHT
from yaqa_ext.arch import find_targets, weight_matrix
from yaqa_ext.hessians import load_hessians
from yaqa_ext.ldl import block_ldl
from yaqa_ext.models import load_model, use_default_shared
from yaqa_ext.rounding import ldlq_round, proxy_loss

SCALES = (0.8, 0.9, 1.0, 1.1, 1.2, 1.3)
DAMPINGS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def relative_proxy(Wt, Hi, Ho, grid, damp: float) -> float:
    L_in = block_ldl(Hi, 2, damp=damp, damp_step=damp).L
    L_out = None if Ho is None else block_ldl(Ho, 2, damp=damp, damp_step=damp).L
    W_hat = ldlq_round(Wt, L_in, L_out, quantizer=grid, td_x=2, td_y=2).W_hat
    return proxy_loss(W_hat - Wt, Hi, Ho) / proxy_loss(Wt, Hi, Ho)


def main(root: str = "yaqa_out/quality-smollm2-hessians") -> None:
    use_default_shared()  # the shared models and corpus: ../shared unless YAQA_SHARED is set
    model, _ = load_model("smollm2-135m")
    print("| factors | layer | " + " | ".join(f"scale x{s}" for s in SCALES) + " | "
          + " | ".join(f"sigma {d:g}" for d in DAMPINGS) + " |")
    print("|" + " --- |" * (2 + len(SCALES) + len(DAMPINGS)))
    for sketch in ("input", "B"):
        factors = load_hessians(f"{root}/{sketch}-seed1")
        for t in find_targets(model, layers=[3, 15]):
            W = weight_matrix(t.module).float()
            H_in, H_out = factors.load(t.name)
            rht = RHT(*W.shape, seed=1)
            Wt = rht.transform_weight(W)
            Hi = rht.transform_input_factor(H_in / H_in.diagonal().mean())
            Ho = None if H_out is None else rht.transform_output_factor(H_out / H_out.diagonal().mean())
            grid = IntCodebook(2, granularity="channel").fit(Wt)
            scales = [relative_proxy(Wt, Hi, Ho, grid.scaled(s), 1e-2) for s in SCALES]
            damps = [relative_proxy(Wt, Hi, Ho, grid, d) for d in DAMPINGS]
            print(f"| {'ldlq' if sketch == 'input' else 'yaqa-B'} | {t.name.split('layers.')[1]} | "
                  + " | ".join(f"{v:.4f}" for v in scales + damps) + " |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:])
