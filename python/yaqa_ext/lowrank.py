"""Low-rank error reconstruction: ``C = A B`` (A: m x k, B: k x n) with ``W ~ W_hat + C``, chosen in closed
form for each objective (ALGORITHMS.md section 7).

- ``svd``: ``min ||dW - C||_F`` (ZeroQuant-V2);
- ``lqer``: ``min ||(dW - C) S||_F``, ``S = diag(mean |x|)`` (LQER);
- ``qera-approx``: the same with ``S = diag(sqrt(E[x_i^2]))``;
- ``qera-exact``: ``min E||x (dW - C)^T||^2 = tr((dW - C) R (dW - C)^T)``, ``R = E[x^T x]``: ``SVD_k(dW R^1/2) R^-1/2``;
- ``kl``: ``min tr((dW - C) H_I (dW - C)^T H_O)``: ``H_O^-1/2 SVD_k(H_O^1/2 dW H_I^1/2) H_I^-1/2``.

Each is exact (Eckart-Young in the weighted norm). Square roots and inverses of the symmetric weights
use their eigendecomposition with every eigenvalue raised to at least ``EIG_FLOOR`` times the largest
(also for a diagonal S): dead input channels then cost nothing instead of making the inverse explode.
Weights are scaled to a mean diagonal of 1 first (the objectives do not change), and the singular
values are split evenly between A and B, so both stay in fp16 range whatever the token count.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["EIG_FLOOR", "INPUT_STAT_METHODS", "LOWRANK_METHODS", "lowrank_correction", "symmetric_sqrt", "truncated_svd"]

LOWRANK_METHODS = ("svd", "lqer", "qera-approx", "qera-exact", "kl")
INPUT_STAT_METHODS = ("lqer", "qera-approx", "qera-exact")
"""The methods weighted by input statistics (a ``sketch="input"`` collection)."""
EIG_FLOOR = 1e-6


def _scaled(M: Tensor) -> Tensor:
    """M in fp64 divided by its mean diagonal (the identity's shape if M is zero: a dead layer weighs nothing)."""
    M = M.double()
    mean = float(M.diagonal().mean()) if M.dim() == 2 else float(M.mean())
    if not mean > 0:
        return torch.eye(M.shape[0], dtype=M.dtype, device=M.device) if M.dim() == 2 else torch.ones_like(M)
    return M / mean


def symmetric_sqrt(H: Tensor, floor: float = EIG_FLOOR) -> tuple[Tensor, Tensor]:
    """``(H^1/2, H^-1/2)`` of a symmetric PSD matrix in fp64, eigenvalues floored at ``floor * max``."""
    lam, V = torch.linalg.eigh(H.double())
    lam = lam.clamp_min(floor * float(lam.max().clamp_min(0)) + 1e-300)
    return (V * lam.sqrt()) @ V.T, (V * lam.rsqrt()) @ V.T


def truncated_svd(M: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The best rank-k approximation ``U_k Sigma_k V_k^T`` of M as ``(U_k Sigma_k^1/2, Sigma_k^1/2 V_k^T)``."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:k].sqrt()
    return U[:, :k] * root, root[:, None] * Vh[:k]


def _diagonal_weight(d: Tensor, floor: float = EIG_FLOOR) -> Tensor:
    d = _scaled(d)
    return d.clamp_min(floor * float(d.max()))


def lowrank_correction(
    dW: Tensor,
    rank: int,
    method: str,
    *,
    x_abs_mean: Tensor | None = None,
    R: Tensor | None = None,
    H_in: Tensor | None = None,
    H_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(A, B)`` (fp64, m x k and k x n) minimising the objective of ``method`` for the error ``dW = W - W_hat``.

    ``lqer`` needs ``x_abs_mean`` (n), ``qera-approx`` / ``qera-exact`` the input second moment ``R``
    (n x n; any positive multiple), ``kl`` the Kronecker factors ``H_in`` (n x n) and ``H_out`` (m x m).
    """
    if method not in LOWRANK_METHODS:
        raise ValueError(f"lowrank method must be one of {LOWRANK_METHODS}, got {method!r}")
    m, n = dW.shape
    k = min(rank, m, n)
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    E = dW.double()
    if k == 0:
        return E.new_zeros(m, 0), E.new_zeros(0, n)
    need = {"lqer": ("x_abs_mean", x_abs_mean), "qera-approx": ("R", R), "qera-exact": ("R", R), "kl": ("H_in", H_in)}
    if method in need and need[method][1] is None:
        raise ValueError(f"lowrank method {method!r} needs {need[method][0]} (from a Hessian collection)")
    if method == "svd":
        return truncated_svd(E, k)
    if method in ("lqer", "qera-approx"):
        s = _diagonal_weight(x_abs_mean) if method == "lqer" else _diagonal_weight(R.diagonal()).sqrt()
        A, B = truncated_svd(E * s, k)
        return A, B / s
    if method == "qera-exact":
        S, S_inv = symmetric_sqrt(_scaled(R))
        A, B = truncated_svd(E @ S, k)
        return A, B @ S_inv
    if H_out is None:
        raise ValueError("lowrank method 'kl' needs H_out too (a Sketch A or B collection)")
    Si, Si_inv = symmetric_sqrt(_scaled(H_in))
    So, So_inv = symmetric_sqrt(_scaled(H_out))
    A, B = truncated_svd(So @ E @ Si, k)
    return So_inv @ A, B @ Si_inv
