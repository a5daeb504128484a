"""Shrinkage of Sketch B's factors toward their per-token part, with a Ledoit-Wolf-style weight from the data.

Each sequence b adds ``S_b = Gw_b^T P Gw_b`` to ``H_in`` (and ``Gw_b P Gw_b^T`` to ``H_out``). With
``Gw_b = sum_t g_t x_t^T``, ``S_b = D_b + C_b``: ``D_b = sum_t (g_t^T P g_t) x_t x_t^T`` pairs each token with
itself and is estimated from every token; ``C_b`` holds the cross-token terms (t != s), one noisy sample per
sequence. The estimate ``D + (1 - lam) C`` (sums over sequences) moves toward the per-token factor by the
``lam`` minimising the expected squared error ``E||(1-lam) S_mean + lam D_mean - Sigma||_F^2``:

    lam* = E<C_mean, S_mean - Sigma> / E||C_mean||^2 = Cov(C_mean, S_mean) / E||C_mean||^2,

the covariance estimated without bias from the per-sequence inner products ``q = sum_b <C_b, S_b>``:
``Cov = (q - N <C_mean, S_mean>) / (N (N - 1))``, and ``E||C_mean||^2`` by ``||C_mean||^2``; lam is clipped to
[0, 1]. lam -> 0 when the cross terms are well estimated (many sequences), -> 1 when they are noise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops

__all__ = ["shrink", "shrinkage_weight", "token_parts"]


def token_parts(X: Tensor, G: Tensor, P_in: Tensor | None, P_out: Tensor | None, dtype: torch.dtype,
                allow_tf32: bool = False) -> tuple[Tensor, Tensor]:
    """The per-token parts of one sequence's Sketch-B terms: ``sum_t (g_t^T P_out g_t) x_t x_t^T`` (n x n) and
    ``sum_t (x_t^T P_in x_t) g_t g_t^T`` (m x m) for X (T, n), G (T, m); a missing P is the identity.
    Computed in ``dtype`` (the accumulators')."""
    x, g = X.to(dtype), G.to(dtype)

    def quad(v: Tensor, P: Tensor | None) -> Tensor:  # v_t^T P v_t per token, >= 0 (P is PSD)
        return (v * v).sum(-1) if P is None else ((v @ P.to(dtype)) * v).sum(-1).clamp_(min=0)

    D_in = torch.zeros(x.size(-1), x.size(-1), dtype=dtype, device=x.device)
    D_out = torch.zeros(g.size(-1), g.size(-1), dtype=dtype, device=x.device)
    ops.input_moment_update(x * quad(g, P_out).sqrt().unsqueeze(-1), D_in, allow_tf32)
    ops.input_moment_update(g * quad(x, P_in).sqrt().unsqueeze(-1), D_out, allow_tf32)
    return D_in, D_out


def shrinkage_weight(total: Tensor, token: Tensor, cross_cov: float, n_samples: int) -> float:
    """``lam`` in [0, 1] from the sums over N sequences: ``total = sum_b S_b``, ``token = sum_b D_b`` and
    ``cross_cov = sum_b <S_b - D_b, S_b>`` (see the module docstring)."""
    if n_samples < 2:
        raise ValueError(f"the shrinkage weight needs at least 2 sequences, got {n_samples}")
    cross = total.double() - token.double()  # fp64 before the difference: the cross part may be small
    energy = float((cross * cross).sum())
    if energy == 0.0:
        return 0.0  # no cross-token terms (one token per sequence): nothing to shrink
    inner = float((cross * total.double()).sum())
    lam = (n_samples * cross_cov - inner) / ((n_samples - 1) * energy)
    return min(1.0, max(0.0, lam))


def shrink(total: Tensor, token: Tensor, lam: float) -> Tensor:
    """``token + (1 - lam) (total - token)``: the factor with its cross-token part scaled down by ``1 - lam``."""
    return torch.lerp(total, token, lam)
