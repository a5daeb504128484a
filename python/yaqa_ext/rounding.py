"""Adaptive rounding: two-sided LDLQ (YAQA), one-sided LDLQ (GPTQ), round-to-nearest, and the proxy loss
``tr(dW H_I dW^T H_O)``."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .codebooks import Codebook, Grid, get_codebook

__all__ = ["Rounded", "ldlq_round", "proxy_loss", "round_to_nearest"]


class Rounded(NamedTuple):
    W_hat: Tensor
    """float32 (m, n): exactly the values of ``codes``."""
    codes: Tensor
    """The codebook's codes (INT: uint8 (m, n) grid indices)."""


def _grid(W: Tensor, quantizer: Codebook | Grid) -> Grid:
    if isinstance(quantizer, Grid):
        return quantizer
    if isinstance(quantizer, Codebook):
        return quantizer.fit(W)
    raise TypeError(f"quantizer must be a Codebook or a Grid (a codebook fitted to W), got {type(quantizer).__name__}")


def ldlq_round(
    W: Tensor,
    L_in: Tensor | None,
    L_out: Tensor | None = None,
    *,
    quantizer: Codebook | Grid,
    td_x: int = 16,
    td_y: int = 16,
) -> Rounded:
    """Two-sided LDLQ: ``W_hat_ij = Q(W_ij + [E L_in + L_out^T E + L_out^T E L_in]_ij)``, E = W - W_hat.

    ``L_in`` / ``L_out`` are the factors of ``block_ldl(H_in, td_y)`` / ``block_ldl(H_out, td_x)`` (only
    their strictly block-lower parts are used); ``L_out=None`` is one-sided LDLQ (= GPTQ for
    ``td_y = 1``), ``L_in=None`` feeds back on the output side only, both None round to nearest. The
    result minimises the proxy loss tile by tile: ``tr(eta D_in eta^T D_out)`` with eta the per-tile
    rounding residual. W must be float32 (m x n) with ``td_x | m``, ``td_y | n``.
    ``quantizer`` gives the grid: a :class:`Codebook` (fitted to W) or a fixed :class:`Grid`.
    """
    grid = _grid(W, quantizer)
    rows, cols = get_codebook(grid.codebook).unit
    if td_x % rows or td_y % cols:
        raise ValueError(f"codebook {grid.codebook!r} codes {rows} x {cols} weights jointly: td_x ({td_x}) and td_y "
                         f"({td_y}) must be multiples of them")
    W_hat, codes = grid.ldlq_round(W, None if L_in is None else L_in.float(), None if L_out is None else L_out.float(),
                                   td_x, td_y)
    return Rounded(W_hat, codes)


def round_to_nearest(W: Tensor, quantizer: Codebook | Grid) -> Rounded:
    """Round-to-nearest on the codebook's grid (no feedback)."""
    grid = _grid(W, quantizer)
    codes = grid.encode(W)
    return Rounded(grid.decode(codes), codes)


def proxy_loss(dW: Tensor, H_in: Tensor, H_out: Tensor | None = None) -> float:
    """``tr(dW H_in dW^T H_out)`` (``H_out = I`` when None) for symmetric factors, as
    ``sum((dW H_in) * (H_out dW))``: no m x m product; products in the inputs' precision (fp64 if any is
    fp64), the final sum in fp64."""
    dtype = torch.promote_types(dW.dtype, H_in.dtype if H_out is None else torch.promote_types(H_in.dtype, H_out.dtype))
    dW = dW.to(dtype)
    right = dW @ H_in.to(dtype)
    return float((right * (dW if H_out is None else H_out.to(dtype) @ dW)).sum(dtype=torch.float64))
