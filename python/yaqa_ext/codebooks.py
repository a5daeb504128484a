"""Quantisers ("codebooks"): map weights to integer codes and back, ``value = (code - z) * s``."""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["IntQuantizer", "QuantParams", "Quantizer", "gaussian_optimal_step"]


@dataclass(frozen=True)
class QuantParams:
    """Per-(row, column group) grid of a weight matrix: ``code = clamp(round(w / s + z), 0, 2^bits - 1)``."""

    scales: Tensor
    """(m, n / group_size) float32, > 0."""
    zeros: Tensor
    """(m, n / group_size) float32 zero points (need not be integers)."""
    bits: int
    group_size: int

    def expand(self, t: Tensor) -> Tensor:
        """A per-group tensor repeated over the columns of its group: (m, n)."""
        return t.repeat_interleave(self.group_size, dim=1)

    def quantize(self, W: Tensor) -> Tensor:
        """Round-to-nearest codes (uint8) of W, the same arithmetic as the rounding kernels."""
        q = torch.round(W.float() / self.expand(self.scales) + self.expand(self.zeros))
        return q.clamp_(0, 2**self.bits - 1).to(torch.uint8)

    def dequantize(self, codes: Tensor) -> Tensor:
        """The float32 values of codes."""
        return (codes.float() - self.expand(self.zeros)) * self.expand(self.scales)


class Quantizer(ABC):
    """A codebook: ``params(W)`` fixes the grid of a weight matrix from its unrounded values."""

    bits: int

    @abstractmethod
    def params(self, W: Tensor) -> QuantParams: ...


@functools.cache
def gaussian_optimal_step(bits: int) -> float:
    """The step of the MSE-optimal uniform midrise quantiser with 2^bits levels for N(0, 1)."""
    levels = 2**bits
    x = torch.linspace(-12.0, 12.0, 240_001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)

    def mse(step: float) -> float:
        q = (torch.floor(x / step) + 0.5).clamp(-levels / 2 + 0.5, levels / 2 - 0.5) * step
        return float(torch.trapezoid((x - q) ** 2 * pdf, x))

    lo, hi = 1e-3, 3.0  # golden-section search; the MSE is unimodal in the step
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = mse(a), mse(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = mse(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = mse(b)
    return (lo + hi) / 2


class IntQuantizer(Quantizer):
    """Scalar INT-k grid, symmetric (midrise, ``z = (2^k - 1) / 2``) or asymmetric (min-max, integer z).

    granularity: ``"tensor"`` (one scale), ``"channel"`` (one per output row) or ``"group"`` (one per row
    and ``group_size`` consecutive input columns, GPTQ style). The starting scale covers the block's
    range (absmax, or min-max through 0); for a symmetric tensor scale without search it is
    ``RMS(W) * step_k``, the Gaussian MSE-optimal step (RHT-processed weights are ~Gaussian).
    ``search=True`` then shrinks each block's scale by the factor in ``SEARCH_GRID`` that minimises
    the block's round-to-nearest squared error (clipping a few outliers for a finer grid).
    Scales are rounded to fp16 values, so the stored fp16 scales reproduce W_hat exactly.
    """

    SUPPORTED_BITS = (2, 3, 4, 8)
    SEARCH_GRID = torch.linspace(0.2, 1.0, 65)

    def __init__(
        self,
        bits: int = 4,
        symmetric: bool = True,
        granularity: Literal["tensor", "channel", "group"] = "channel",
        group_size: int = 128,
        search: bool = True,
    ) -> None:
        if bits not in self.SUPPORTED_BITS:
            raise ValueError(f"IntQuantizer supports bits in {self.SUPPORTED_BITS}, got {bits}")
        if granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"granularity must be 'tensor', 'channel' or 'group', got {granularity!r}")
        if granularity == "group" and group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.bits, self.symmetric, self.granularity, self.group_size = bits, symmetric, granularity, group_size
        self.search = search

    def __repr__(self) -> str:
        group = f", group_size={self.group_size}" if self.granularity == "group" else ""
        return (f"IntQuantizer(bits={self.bits}, symmetric={self.symmetric}, granularity={self.granularity!r}{group}, "
                f"search={self.search})")

    def params(self, W: Tensor) -> QuantParams:
        if W.dim() != 2:
            raise ValueError(f"IntQuantizer: W must be 2-D, got shape {tuple(W.shape)}")
        if not bool(torch.isfinite(W).all()):
            raise ValueError("IntQuantizer: W has NaN or infinite entries; a grid cannot represent them (check the "
                             "checkpoint, or skip the layer with QuantConfig(skip=...))")
        m, n = W.shape
        gs = self.group_size if self.granularity == "group" else n
        if n % gs:
            raise ValueError(f"IntQuantizer: group_size {gs} does not divide the {n} input columns of W")
        top = 2**self.bits - 1
        blocks = W.detach().float().reshape(1, 1, -1) if self.granularity == "tensor" else W.detach().float().reshape(m, n // gs, gs)
        if self.symmetric:
            s = blocks.abs().amax(-1, keepdim=True) / (top / 2)
            if self.granularity == "tensor" and not self.search:
                s = blocks.square().mean(-1, keepdim=True).sqrt() * gaussian_optimal_step(self.bits)
            z = torch.full_like(s, top / 2)
        else:  # the range always holds 0, as in GPTQ; shrinking s by a factor keeps z = round(-lo / s)
            lo, hi = blocks.amin(-1, keepdim=True).clamp(max=0), blocks.amax(-1, keepdim=True).clamp(min=0)
            s = (hi - lo) / top
            z = torch.where(s > 0, torch.round(-lo / s.clamp_min(1e-30)), torch.zeros_like(s)).clamp(0, top)
        if self.search:
            s = self._search(blocks, s, z, top)
        # fp16-exact scales; an all-zero block gets the smallest normal fp16 scale (levels ~1e-5 from 0).
        s = s.clamp(2**-14, 65504.0).half().float()
        shape = (m, n // gs)
        return QuantParams(s.squeeze(-1).expand(shape).contiguous(), z.squeeze(-1).expand(shape).contiguous(),
                           self.bits, gs)

    def _search(self, blocks: Tensor, base: Tensor, z: Tensor, top: int) -> Tensor:
        """Per block, the scale ``a * base`` (a in SEARCH_GRID) with the least round-to-nearest error."""
        best, best_err = base, torch.full_like(base, float("inf"))
        for a in self.SEARCH_GRID.tolist():
            s = (base * a).clamp_min(2**-14)
            err = (((blocks / s + z).round_().clamp_(0, top) - z) * s - blocks).square_().sum(-1, keepdim=True)
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
        return best
