"""Evaluation: mean per-token ``KL(p_orig || p_quant)`` and the perplexity of both models on held-out text."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import prepare_tokens
from .progress import progress_bar

__all__ = ["EvalResult", "evaluate", "lm_eval_tasks", "reference_logits"]


@dataclass
class EvalResult:
    kl: float
    """Mean over tokens of KL(p_orig || p_quant), in nats."""
    ppl_orig: float
    ppl_quant: float
    tokens: int


_CHUNK = 16
"""Tokens whose statistics are computed at once (temporaries of a few MB stay in cache)."""


def _token_stats(a: torch.Tensor, b: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, float]:
    """Sums over tokens of ``KL(softmax a || softmax b)`` and of the negative log-likelihoods of both
    (targets < 0: no prediction), from the logit differences ``d = b - a``:
    ``LSE(b) - LSE(a) = log E_p[e^d] = mu + log1p(E_p[expm1(d - mu)])`` with ``mu = E_p[d]``, so
    ``KL = E_p[log p - log q] = log1p(E_p[expm1(d - mu)]) - E_p[d - mu]``. Every term is of the size of the
    logit differences, not of the logits, so the logits' own precision (fp32, or fp64 for fp64) gives KL to
    ~1e-6 relative even near 0; the sums over the vocabulary are fp64. Rows whose differences overflow the
    exponential fall back to log-sum-exps in fp64."""
    dt = torch.promote_types(a.dtype, torch.float32)
    a, b = a.to(dt), b.to(dt)
    lse_a = torch.logsumexp(a, -1)
    p = torch.exp(a - lse_a.unsqueeze(-1))
    d = b - a
    mu = (p * d).sum(-1, dtype=torch.float64)
    dc = d - mu.to(dt).unsqueeze(-1)
    log_ratio = torch.log1p((p * torch.expm1(dc)).sum(-1, dtype=torch.float64))  # log E_p[e^(d - mu)]
    kl = log_ratio - (p * dc).sum(-1, dtype=torch.float64)
    lse_b = lse_a.double() + mu + log_ratio
    bad = ~torch.isfinite(kl)
    if bool(bad.any()):
        a64, b64 = a[bad].double(), b[bad].double()
        la, lb = torch.logsumexp(a64, -1), torch.logsumexp(b64, -1)
        kl[bad] = (torch.exp(a64 - la.unsqueeze(-1)) * (a64 - b64)).sum(-1) - la + lb
        lse_b[bad] = lb
    live = targets >= 0
    t = targets[live].unsqueeze(-1)
    nll_a = float((lse_a[live].double() - a[live].gather(-1, t).squeeze(-1).double()).sum())
    nll_b = float((lse_b[live] - b[live].gather(-1, t).squeeze(-1).double()).sum())
    return float(kl.sum()), nll_a, nll_b


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits of a batch, on the CPU in the model's own precision."""
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), use_cache=False).logits.cpu()


@torch.no_grad()
def reference_logits(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8, progress: bool = True
                     ) -> list[torch.Tensor]:
    """The logits of ``tokens`` (n_seqs, seq_len) under ``model``, batch by batch as :func:`evaluate` cuts
    them: computed once, they stand in for the original model in every later evaluation on the same tokens."""
    batches, logits = tokens.split(batch_size), []
    with progress_bar(len(batches), "reference logits", "batch", enabled=progress) as bar:
        for batch in batches:
            logits.append(_logits(model, batch))
            bar.update(1)
    return logits


@torch.no_grad()
def evaluate(
    orig_model: nn.Module | None,
    quant_model: nn.Module,
    data,
    *,
    tokenizer=None,
    n_seqs: int = 32,
    seq_len: int = 256,
    batch_size: int = 8,
    orig_logits: list[torch.Tensor] | None = None,
    progress: bool = True,
) -> EvalResult:
    """KL and perplexities over ``n_seqs`` sequences of ``seq_len`` tokens of ``data`` (deterministic: the
    first tokens of the data, cut in order; see :func:`yaqa_ext.data.prepare_tokens`); see
    :func:`_token_stats` for the arithmetic. ``orig_logits`` (from :func:`reference_logits` on the same tokens and ``batch_size``)
    replaces running ``orig_model``, which may then be None."""
    tokens = prepare_tokens(data, tokenizer, n_seqs, seq_len)
    batches = tokens.split(batch_size)
    if orig_logits is None:
        if orig_model is None:
            raise ValueError("evaluate needs orig_model, or orig_logits from reference_logits()")
    elif len(orig_logits) != len(batches) or any(l.shape[:2] != b.shape for l, b in zip(orig_logits, batches)):
        raise ValueError(f"orig_logits do not match the {tokens.size(0)} x {seq_len} tokens in batches of {batch_size}; "
                         "compute them with reference_logits() on the same tokens and batch_size")
    kl_sum, nll_orig, nll_quant = 0.0, 0.0, 0.0
    with progress_bar(len(batches), "evaluate", "batch", enabled=progress) as bar:
        for i, batch in enumerate(batches):
            a = orig_logits[i] if orig_logits is not None else _logits(orig_model, batch)
            b = _logits(quant_model, batch)
            next_tokens = F.pad(batch[:, 1:], (0, 1), value=-1)  # the last position predicts nothing
            for rows in zip(*(t.flatten(0, 1).split(_CHUNK) for t in (a, b)), next_tokens.flatten().split(_CHUNK)):
                kl, nll_a, nll_b = _token_stats(*rows)
                kl_sum, nll_orig, nll_quant = kl_sum + kl, nll_orig + nll_a, nll_quant + nll_b
            bar.update(1)
    predicted = tokens.size(0) * (seq_len - 1)
    return EvalResult(
        kl=kl_sum / tokens.numel(),
        ppl_orig=math.exp(nll_orig / predicted),
        ppl_quant=math.exp(nll_quant / predicted),
        tokens=tokens.numel(),
    )


def lm_eval_tasks(models: dict[str, nn.Module], tokenizer, tasks: list[str], *, include_path: str | None = None,
                  limit: int | float | None = None, batch_size: int = 8) -> dict[str, dict[str, dict]]:
    """lm-evaluation-harness ``tasks`` on each in-memory model (label -> model; e.g. the original and the quantized
    one), through its Hugging Face model class: label -> task -> metrics. ``include_path``: a folder of task YAML
    files (local tasks over local data work offline); ``limit``: documents per task (a fraction below 1). Needs the
    ``lm_eval`` package (not a dependency of yaqa_ext)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError("tasks run with lm-evaluation-harness: pip install lm_eval (not a dependency of yaqa_ext)") from None
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm_eval knows no task {', '.join(map(repr, unknown))}"
                         + ("" if include_path else "; a local task needs its YAML folder as include_path (--include-path)"))
    results = {}
    for label, model in models.items():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, verbosity="ERROR")
        results[label] = out["results"]
    return results
