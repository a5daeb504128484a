"""Blocked LDL factorisation with damping retries: ``H + d*mean(diag H)*I = L blockdiag(D) L^T``."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import ops

__all__ = ["BlockLDL", "block_ldl"]


class BlockLDL(NamedTuple):
    """Result of :func:`block_ldl`: ``H + damp * mean(diag(H)) * I = L @ blockdiag(*D) @ L.T``."""

    L: Tensor
    """Unit block-lower-triangular factor, (n, n); its diagonal blocks are exactly I."""
    D: Tensor
    """Diagonal blocks, (n / block_size, block_size, block_size), symmetric positive definite."""
    damp: float
    """Relative damping that was added (0.0 when H factored as given)."""


def block_ldl(
    H: Tensor,
    block_size: int = 16,
    damp: float = 0.0,
    max_damp_tries: int = 8,
    damp_step: float = 1e-2,
) -> BlockLDL:
    """Blocked LDL of a symmetric positive definite matrix, damping it until it factors.

    Attempt ``k = 0, 1, ..., max_damp_tries`` factors ``H + d_k * mean(diag(H)) * I`` with
    ``d_k = damp + k * damp_step``; the first that is positive definite is returned together
    with its ``d_k``. Only the lower triangle of ``H`` is read. ``H`` keeps its dtype
    (float32 or float64) and device; it is never modified.

    Example::

        >>> H = X.T @ X                                   # an n x n input second moment
        >>> L, D, damp = yaqa_ext.block_ldl(H, block_size=16, damp=1e-2)

    Raises:
        TypeError: ``H`` is not a float32/float64 tensor.
        ValueError: ``H`` is not square, ``block_size`` does not divide n, ``H`` holds a NaN or
            infinity, or a damping argument is negative.
        torch.linalg.LinAlgError: ``H`` stayed indefinite at every damping tried.
    """
    if not isinstance(H, Tensor):
        raise TypeError(f"block_ldl: H must be a torch.Tensor, got {type(H).__name__}")
    if damp < 0 or damp_step < 0 or max_damp_tries < 0:
        raise ValueError(
            f"block_ldl: damp ({damp}), damp_step ({damp_step}) and max_damp_tries ({max_damp_tries}) must be >= 0"
        )
    tried: list[float] = []
    scale: Tensor | None = None
    for k in range(max_damp_tries + 1):
        d = damp + k * damp_step
        if k > 0 and d == tried[-1]:
            break  # damp_step == 0: a retry would repeat the same factorisation
        if d == 0.0:
            Hd = H
        else:
            if scale is None:
                scale = H.diagonal().mean()
                if not scale > 0:  # damping relative to a zero (or negative) mean diagonal adds nothing
                    raise torch.linalg.LinAlgError(
                        f"block_ldl: the {H.size(0)} x {H.size(1)} matrix is not positive definite and its mean "
                        f"diagonal is {float(scale):g}, so relative damping cannot make it so; a zero H means "
                        "no data reached this layer (use the identity: round to nearest)"
                    )
            Hd = H + torch.diag_embed((d * scale).expand(H.size(0)))
        L, D, info = ops.block_ldl(Hd, block_size)
        status = int(info)
        if status == 0:
            return BlockLDL(L, D, d)
        if status == -1:
            raise ValueError(
                f"block_ldl: H ({H.size(0)} x {H.size(1)}) has NaN or infinite entries; "
                "check the data or the accumulation that produced it"
            )
        tried.append(d)
    raise torch.linalg.LinAlgError(
        f"block_ldl: the {H.size(0)} x {H.size(1)} matrix is not positive definite even with relative "
        f"damping {', '.join(f'{t:g}' for t in tried)} (times mean(diag(H)) = {float(H.diagonal().mean()):g}); "
        f"the last attempt failed at the leading minor of order {status}. "
        "Increase damp, damp_step or max_damp_tries, or check that H is a sum of outer products."
    )
