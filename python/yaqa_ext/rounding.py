"""Adaptive rounding: two-sided LDLQ (YAQA), one-sided LDLQ (GPTQ), round-to-nearest, and the proxy loss
``tr(dW H_I dW^T H_O)``."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import ops
from .codebooks import QuantParams, Quantizer

__all__ = ["Rounded", "ldlq_round", "proxy_loss", "round_to_nearest"]


class Rounded(NamedTuple):
    W_hat: Tensor
    """float32 (m, n): exactly the values of ``codes``."""
    codes: Tensor
    """uint8 (m, n) grid indices."""


def _params(W: Tensor, quantizer: Quantizer | QuantParams) -> QuantParams:
    if isinstance(quantizer, QuantParams):
        return quantizer
    if isinstance(quantizer, Quantizer):
        return quantizer.params(W)
    raise TypeError(f"quantizer must be a Quantizer or QuantParams, got {type(quantizer).__name__}")


def ldlq_round(
    W: Tensor,
    L_in: Tensor | None,
    L_out: Tensor | None = None,
    *,
    quantizer: Quantizer | QuantParams,
    td_x: int = 16,
    td_y: int = 16,
) -> Rounded:
    """Two-sided LDLQ: ``W_hat_ij = Q(W_ij + [E L_in + L_out^T E + L_out^T E L_in]_ij)``, E = W - W_hat.

    ``L_in`` / ``L_out`` are the factors of ``block_ldl(H_in, td_y)`` / ``block_ldl(H_out, td_x)`` (only
    their strictly block-lower parts are used); ``L_out=None`` is one-sided LDLQ (= GPTQ for
    ``td_y = 1``), ``L_in=None`` feeds back on the output side only, both None round to nearest. The
    result minimises the proxy loss tile by tile: ``tr(eta D_in eta^T D_out)`` with eta the per-tile
    rounding residual. W must be float32 (m x n) with ``td_x | m``, ``td_y | n``.
    ``quantizer`` gives the grid: a :class:`Quantizer` (parameters from W) or fixed :class:`QuantParams`.
    """
    params = _params(W, quantizer)
    W_hat, codes = ops.ldlq_round(
        W, None if L_in is None else L_in.float(), None if L_out is None else L_out.float(), params.scales,
        params.zeros, params.bits, params.group_size, td_x, td_y,
    )
    return Rounded(W_hat, codes)


def round_to_nearest(W: Tensor, quantizer: Quantizer | QuantParams) -> Rounded:
    """Round-to-nearest on the quantiser's grid (no feedback)."""
    params = _params(W, quantizer)
    codes = params.quantize(W)
    return Rounded(params.dequantize(codes), codes)


def proxy_loss(dW: Tensor, H_in: Tensor, H_out: Tensor | None = None) -> float:
    """``tr(dW H_in dW^T H_out)`` (``H_out = I`` when None) for symmetric factors, as
    ``sum((dW H_in) * (H_out dW))``: no m x m product; products in the inputs' precision (fp64 if any is
    fp64), the final sum in fp64."""
    dtype = torch.promote_types(dW.dtype, H_in.dtype if H_out is None else torch.promote_types(H_in.dtype, H_out.dtype))
    dW = dW.to(dtype)
    right = dW @ H_in.to(dtype)
    return float((right * (dW if H_out is None else H_out.to(dtype) @ dW)).sum(dtype=torch.float64))
