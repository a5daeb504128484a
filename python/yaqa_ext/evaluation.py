"""Evaluation: mean per-token ``KL(p_orig || p_quant)`` and the perplexity of both models on held-out text."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import prepare_tokens

__all__ = ["EvalResult", "evaluate"]


@dataclass
class EvalResult:
    kl: float
    """Mean over tokens of KL(p_orig || p_quant), in nats."""
    ppl_orig: float
    ppl_quant: float
    tokens: int


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), use_cache=False).logits.to(device="cpu", dtype=torch.float64)


@torch.no_grad()
def evaluate(
    orig_model: nn.Module,
    quant_model: nn.Module,
    data,
    *,
    tokenizer=None,
    n_seqs: int = 32,
    seq_len: int = 256,
    batch_size: int = 8,
) -> EvalResult:
    """KL and perplexities over ``n_seqs`` sequences of ``seq_len`` tokens of ``data`` (deterministic: the
    first tokens of the data, cut in order; see :func:`yaqa_ext.data.prepare_tokens`)."""
    tokens = prepare_tokens(data, tokenizer, n_seqs, seq_len)
    kl_sum, nll_orig, nll_quant = 0.0, 0.0, 0.0
    for batch in tokens.split(batch_size):
        lp_orig = torch.log_softmax(_logits(orig_model, batch), dim=-1)
        lp_quant = torch.log_softmax(_logits(quant_model, batch), dim=-1)
        kl_sum += float((lp_orig.exp() * (lp_orig - lp_quant)).sum())
        targets = batch[:, 1:].flatten()
        nll_orig += float(F.nll_loss(lp_orig[:, :-1].flatten(0, 1), targets, reduction="sum"))
        nll_quant += float(F.nll_loss(lp_quant[:, :-1].flatten(0, 1), targets, reduction="sum"))
    predicted = tokens.size(0) * (seq_len - 1)
    return EvalResult(
        kl=kl_sum / tokens.numel(),
        ppl_orig=math.exp(nll_orig / predicted),
        ppl_quant=math.exp(nll_quant / predicted),
        tokens=tokens.numel(),
    )
