"""A short demonstration on a real model: factor every linear layer's input Hessian with block_ldl."""

from __future__ import annotations

import time

import torch
from torch import nn

from .data import read_texts, token_sequences
from .ldl import block_ldl
from .models import load_model, shared_dir

__all__ = ["input_hessians", "run_demo"]


@torch.no_grad()
def input_hessians(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``H = sum_t x_t^T x_t`` (fp64) of the inputs of every ``nn.Linear`` except the LM head."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not model.get_output_embeddings()}
    hessians = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=tokens.device) for name, m in linears.items()}

    def hook(name):
        def accumulate(_module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            hessians[name].addmm_(x.T, x)

        return accumulate

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    try:
        for batch in tokens.split(batch_size):
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return hessians


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def run_demo(model_name: str, data: str | None, n_seqs: int, seq_len: int, block_size: int, device: str) -> None:
    model, tokenizer = load_model(model_name, device=device)
    source = data if data is not None else shared_dir() / "data" / "corpus" / "moby-dick" / "moby-dick.txt"
    tokens = token_sequences(tokenizer, read_texts(source), n_seqs, seq_len).to(device)
    print(f"model {model_name}: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{tokens.numel():,} tokens of {source}")
    hessians = input_hessians(model, tokens)
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
