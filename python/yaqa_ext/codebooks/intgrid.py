"""The scalar INT-k codebook: ``code = clamp(round(w / s + z), 0, 2^k - 1)``, ``value = (code - z) * s`` with a
scale s and zero point z per (row, column group); stored as a k-bit stream per row plus fp16 scales and zeros."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .. import ops
from .._C import WITH_CUDA
from ..bitpack import pack_codes, unpack_codes
from ..hadamard import RHT
from .base import Codebook, Grid, fp16_scale, golden_section, register_codebook

__all__ = ["IntCodebook", "IntGrid", "gaussian_optimal_step"]


@dataclass(frozen=True)
class IntGrid(Grid):
    """Per-(row, column group) grid of a weight matrix: ``code = clamp(round(w / s + z), 0, 2^bits - 1)``."""

    codebook: ClassVar[str] = "int"

    scales: Tensor
    """(m, n / group_size) float32, > 0."""
    zeros: Tensor
    """(m, n / group_size) float32 zero points (need not be integers)."""
    bits: int
    group_size: int

    def expand(self, t: Tensor) -> Tensor:
        """A per-group tensor repeated over the columns of its group: (m, n)."""
        return t.repeat_interleave(self.group_size, dim=1)

    def encode(self, W: Tensor) -> Tensor:
        """Round-to-nearest codes (uint8) of W, the same arithmetic as the rounding kernels."""
        q = torch.round(W.float() / self.expand(self.scales) + self.expand(self.zeros))
        return q.clamp_(0, 2**self.bits - 1).to(torch.uint8)

    def decode(self, codes: Tensor) -> Tensor:
        return (codes.float() - self.expand(self.zeros)) * self.expand(self.scales)

    def ldlq_round(self, W: Tensor, L_in: Tensor | None, L_out: Tensor | None, td_x: int, td_y: int
                   ) -> tuple[Tensor, Tensor]:
        return ops.ldlq_round(W, L_in, L_out, self.scales, self.zeros, self.bits, self.group_size, td_x, td_y)

    def scaled(self, factor: float) -> IntGrid:
        """Scales times ``factor``, rounded to fp16 as stored; zero points unchanged."""
        return replace(self, scales=fp16_scale(self.scales * factor))

    def stored(self) -> tuple[Tensor, Tensor]:
        """Scales and zeros as stored: one row when every row is the same."""
        return tuple(t[:1] if bool((t == t[:1]).all()) else t for t in (self.scales, self.zeros))

    def layout(self) -> dict[str, Any]:
        scales, zeros = self.stored()
        return {"bits": self.bits, "group_size": self.group_size, "scale_rows": scales.size(0),
                "zero_rows": zeros.size(0)}


@functools.cache
def gaussian_optimal_step(bits: int) -> float:
    """The step of the MSE-optimal uniform midrise quantiser with 2^bits levels for N(0, 1)."""
    levels = 2**bits
    x = torch.linspace(-12.0, 12.0, 240_001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)

    def mse(step: float) -> float:
        q = (torch.floor(x / step) + 0.5).clamp(-levels / 2 + 0.5, levels / 2 - 0.5) * step
        return float(torch.trapezoid((x - q) ** 2 * pdf, x))

    return golden_section(mse, 1e-3, 3.0, 60)  # the MSE is unimodal in the step



@register_codebook
class IntCodebook(Codebook):
    """Scalar INT-k grid, symmetric (midrise, ``z = (2^k - 1) / 2``) or asymmetric (min-max, integer z).

    granularity: ``"tensor"`` (one scale), ``"channel"`` (one per output row) or ``"group"`` (one per row
    and ``group_size`` consecutive input columns, GPTQ style). The starting scale covers the block's
    range (absmax, or min-max through 0); for a symmetric tensor scale without search it is
    ``RMS(W) * step_k``, the Gaussian MSE-optimal step (RHT-processed weights are ~Gaussian).
    ``search=True`` then shrinks each block's scale by the factor in ``SEARCH_GRID`` that minimises
    the block's round-to-nearest squared error (clipping a few outliers for a finer grid).
    Scales are rounded to fp16 values, so the stored fp16 scales reproduce W_hat exactly.
    """

    name: ClassVar[str] = "int"
    format_version: ClassVar[int] = 1
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
            raise ValueError(f"IntCodebook supports bits in {self.SUPPORTED_BITS}, got {bits}")
        if granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"granularity must be 'tensor', 'channel' or 'group', got {granularity!r}")
        if granularity == "group" and group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.bits, self.symmetric, self.granularity, self.group_size = bits, symmetric, granularity, group_size
        self.search = search

    @classmethod
    def from_config(cls, config: Any) -> IntCodebook:
        if config.group_size is not None:
            return cls(config.bits, config.symmetric, "group", config.group_size)
        return cls(config.bits, config.symmetric, config.scale)

    def __repr__(self) -> str:
        group = f", group_size={self.group_size}" if self.granularity == "group" else ""
        return (f"IntCodebook(bits={self.bits}, symmetric={self.symmetric}, granularity={self.granularity!r}{group}, "
                f"search={self.search})")

    def fit(self, W: Tensor) -> IntGrid:
        if W.dim() != 2:
            raise ValueError(f"IntCodebook: W must be 2-D, got shape {tuple(W.shape)}")
        if not bool(torch.isfinite(W).all()):
            raise ValueError("IntCodebook: W has NaN or infinite entries; a grid cannot represent them (check the "
                             "checkpoint, or skip the layer with QuantConfig(skip=...))")
        m, n = W.shape
        gs = self.group_size if self.granularity == "group" else n
        if n % gs:
            raise ValueError(f"IntCodebook: group_size {gs} does not divide the {n} input columns of W")
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
        s = fp16_scale(s)
        if self.search:
            s = self._search(blocks, s, z, top)
        shape = (m, n // gs)
        return IntGrid(s.squeeze(-1).expand(shape).contiguous(), z.squeeze(-1).expand(shape).contiguous(),
                           self.bits, gs)

    def _search(self, blocks: Tensor, base: Tensor, z: Tensor, top: int) -> Tensor:
        """Per block, the scale ``a * base`` (a in SEARCH_GRID, rounded to the fp16 value it is stored as) with
        the least round-to-nearest error."""
        best, best_err = base, torch.full_like(base, float("inf"))
        for a in self.SEARCH_GRID.tolist():
            s = fp16_scale(base * a)
            err = (((blocks / s + z).round_().clamp_(0, top) - z) * s - blocks).square_().sum(-1, keepdim=True)
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
        return best

    # Storage: buffers qweight ((m, ceil(n / 8) * bits) uint8), scales and zeros ((1 or m, n / group_size) fp16).

    @classmethod
    def create_weights(cls, layer: nn.Module, in_features: int, out_features: int, *, bits: int, group_size: int,
                       scale_rows: int, zero_rows: int) -> None:
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {bits}")
        if group_size < 1 or in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        if scale_rows not in (1, out_features) or zero_rows not in (1, out_features):
            raise ValueError(f"scale_rows ({scale_rows}) and zero_rows ({zero_rows}) must be 1 or out_features "
                             f"({out_features})")
        groups = in_features // group_size
        layer.register_buffer("qweight", torch.zeros(out_features, (in_features + 7) // 8 * bits, dtype=torch.uint8))
        layer.register_buffer("scales", torch.ones(scale_rows, groups, dtype=torch.float16))
        layer.register_buffer("zeros", torch.zeros(zero_rows, groups, dtype=torch.float16))

    @classmethod
    def pack(cls, layer: nn.Module, codes: Tensor, grid: IntGrid) -> None:
        scales, zeros = grid.stored()
        if not (torch.equal(scales.half().float(), scales) and torch.equal(zeros.half().float(), zeros)):
            raise ValueError("the INT codebook stores fp16 scales and zero points; these are not fp16 values")
        layer.qweight.copy_(pack_codes(codes, grid.bits))
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)

    @classmethod
    def unpack(cls, layer: nn.Module) -> tuple[Tensor, IntGrid]:
        bits, group_size = layer.layout["bits"], layer.layout["group_size"]
        shape = (layer.out_features, layer.in_features // group_size)
        grid = IntGrid(layer.scales.float().expand(shape), layer.zeros.float().expand(shape), bits, group_size)
        return unpack_codes(layer.qweight, bits, layer.in_features), grid

    @classmethod
    def check_values(cls, layer: nn.Module, name: str) -> None:
        for key, positive in (("scales", True), ("zeros", False)):
            t = getattr(layer, key)
            if not bool((torch.isfinite(t) & ((t > 0) if positive else True)).all()):
                raise ValueError(f"{name}.{key} holds {'non-positive, ' if positive else ''}NaN or infinite values; "
                                 "the file is corrupt: quantize the model again")

    @classmethod
    def matmul(cls, layer: nn.Module, x: Tensor, rht: RHT | None) -> Tensor:
        """The fused op (codes decoded as they are used, the RHT applied inside) on a backend that has its kernel
        (CPU; CUDA in a CUDA build) when no gradient is needed; else, until the op has a backward, the dequantized
        weight's matmul."""
        kernel = x.device.type == "cpu" or (x.device.type == "cuda" and WITH_CUDA)
        if kernel and not (torch.is_grad_enabled() and x.requires_grad):
            return ops.int_matmul(x, layer.qweight, layer.scales, layer.zeros, layer.layout["bits"],
                                  layer.layout["group_size"], *(() if rht is None else rht.fused_args(x.device)))
        return cls.dequantized_matmul(layer, x, rht)

    @classmethod
    def upgrade_layout(cls, layout: dict[str, Any], version: int) -> dict[str, Any]:
        """Format 0 (no version recorded, before codebooks had names) stored the same buffers."""
        if version == 0:
            return layout
        return super().upgrade_layout(layout, version)
