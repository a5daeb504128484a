"""A short demonstration on a real model: factor every linear layer's input Hessian with block_ldl."""

from __future__ import annotations

import tempfile
import time

import torch

from .data import read_texts
from .hessians import collect_hessians, load_hessians
from .ldl import block_ldl
from .models import load_model, shared_dir

__all__ = ["run_demo"]


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def run_demo(model_name: str, data: str | None, n_seqs: int, seq_len: int, block_size: int, device: str) -> None:
    model, tokenizer = load_model(model_name, device=device)
    source = data if data is not None else shared_dir() / "data" / "corpus" / "moby-dick" / "moby-dick.txt"
    print(f"model {model_name}: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{n_seqs * seq_len:,} tokens of {source}")
    with tempfile.TemporaryDirectory() as tmp:
        collect_hessians(model, read_texts(source), tmp, tokenizer=tokenizer, sketch="input", n_seqs=n_seqs,
                         seq_len=seq_len, accum_dtype=torch.float64, progress=False)
        factors = load_hessians(tmp)
        hessians = {name: factors.load(name, device)[0] for name in factors.modules}
    print(f"{'layer':40s} {'n':>5s} {'block':>5s} {'damp':>6s} {'rel. error':>10s} {'ms':>7s}")
    for name, H in hessians.items():
        H = H.float()
        b = _largest_divisor_at_most(H.size(0), block_size)
        start = time.perf_counter()
        L, D, damp = block_ldl(H, block_size=b)
        if H.is_cuda:
            torch.cuda.synchronize()
        ms = 1e3 * (time.perf_counter() - start)
        Hd = H.double() + damp * H.diagonal().double().mean() * torch.eye(H.size(0), dtype=torch.float64, device=H.device)
        R = L.double() @ torch.block_diag(*D.double()) @ L.double().T
        err = float(torch.linalg.matrix_norm(R - Hd) / torch.linalg.matrix_norm(Hd))
        print(f"{name:40s} {H.size(0):5d} {b:5d} {damp:6.3g} {err:10.2e} {ms:7.2f}")
