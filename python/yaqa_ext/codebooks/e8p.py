"""The E8P lattice codebook (after QuIP#, arXiv 2402.04396; our construction): 8 weights jointly as one of
2^16 points of the shifted lattice E8 + 1/4, ``value = sign * a + shift`` times a per-row scale; 2 bits per
weight. 3 and 4 bits add a residual stage (greedy residual VQ): the error's signs (+-1, 1 bit per weight) or
its nearest E8P point, each at its own scale.

The 256 patterns ``a`` are the positive half-integer 8-vectors of least norm: all 227 of squared norm <= 10,
then the first 29 of squared norm 12 in lexicographic order. A sign pattern is valid when its number of
negative entries has the parity that puts ``sign * a`` in E8 (an even coordinate sum), so 7 sign bits code it;
the shift is +-1/4. Code bits: 0-7 the pattern, 8-14 the signs of entries 0-6, 15 the shift (csrc/e8p.h).
After the RHT the weights are ~Gaussian, so each row's scale is its RMS times the constant that minimises a
Gaussian's squared error (computed once, on a fixed Gaussian sample)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .. import ops
from .._C import WITH_CUDA
from ..hadamard import RHT
from .base import Codebook, Grid, fp16_scale, golden_section, register_codebook, rms_scale

__all__ = ["E8PCodebook", "E8PGrid", "e8p_abs_grid", "e8p_gaussian_scales"]

PATTERNS = 256


@functools.cache
def _abs_grid_cpu() -> Tensor:
    halves = torch.tensor([0.5, 1.5, 2.5, 3.5])
    candidates = torch.cartesian_prod(*[halves] * 8)  # lexicographic: the first entry varies slowest
    order = torch.sort(candidates.square().sum(1), stable=True).indices
    return candidates[order[:PATTERNS]].contiguous()


@functools.cache
def e8p_abs_grid(device: torch.device | str = "cpu") -> Tensor:
    """The (256, 8) float32 pattern table on ``device``."""
    return _abs_grid_cpu().to(device)


def _parity(grid: Tensor) -> Tensor:
    """Per pattern, the parity of the number of negative entries of its codewords: (sum of 2 a_k) / 2 mod 2."""
    return ((grid * 2).sum(1) / 2).remainder(2).long()


def _decode_stage(codes: Tensor, grid: Tensor) -> Tensor:
    """The (..., 8) values of 16-bit E8P codes (int64)."""
    pattern, low, shift = codes & 255, (codes >> 8) & 127, (codes >> 15) & 1
    low_bits = (low.unsqueeze(-1) >> torch.arange(7, device=codes.device)) & 1
    last = (low_bits.sum(-1) + _parity(grid)[pattern]) & 1
    negative = torch.cat([low_bits, last.unsqueeze(-1)], -1).bool()
    a = grid[pattern]
    return torch.where(negative, -a, a) + torch.where(shift.bool(), -0.25, 0.25).unsqueeze(-1)


def decode_units(codes: Tensor, bits: int) -> tuple[Tensor, Tensor | None]:
    """The stage values (unscaled, float32 (m, n)) of int32 codes (m, n / 8): stage 1 and stage 2 (or None)."""
    grid = e8p_abs_grid(codes.device)
    c = codes.long() & 0xFFFFFFFF
    m = codes.size(0)
    first = _decode_stage(c & 0xFFFF, grid).reshape(m, -1)
    if bits == 2:
        return first, None
    if bits == 3:
        signs = ((c >> 16).unsqueeze(-1) >> torch.arange(8, device=codes.device)) & 1
        return first, (1 - 2 * signs).float().reshape(m, -1)
    return first, _decode_stage(c >> 16, grid).reshape(m, -1)


def _stages(bits: int) -> int:
    return 1 if bits == 2 else 2



@dataclass(frozen=True)
class E8PGrid(Grid):
    """One row's (or the whole matrix's) scale per stage: ``W_hat = s1 v1 + s2 v2`` per unit of 8 weights."""

    codebook: ClassVar[str] = "e8p"

    scales: Tensor
    """(m, stages) float32 fp16 values, > 0."""
    bits: int

    def encode(self, W: Tensor) -> Tensor:
        """The int32 (m, n / 8) codes of round-to-nearest (stage by stage), by the rounding kernel."""
        return self.ldlq_round(W.float(), None, None, 1, 8)[1]

    def decode(self, codes: Tensor) -> Tensor:
        first, second = decode_units(codes, self.bits)
        W_hat = first * self.scales[:, :1]
        return W_hat if second is None else W_hat + second * self.scales[:, 1:]

    def ldlq_round(self, W: Tensor, L_in: Tensor | None, L_out: Tensor | None, td_x: int, td_y: int
                   ) -> tuple[Tensor, Tensor]:
        return ops.ldlq_round_e8p(W, L_in, L_out, self.scales, e8p_abs_grid(W.device), self.bits, td_x, td_y)

    def scaled(self, factor: float) -> E8PGrid:
        return replace(self, scales=fp16_scale(self.scales * factor))

    def stored(self) -> Tensor:
        """The scales as stored: one row when every row is the same."""
        return self.scales[:1] if bool((self.scales == self.scales[:1]).all()) else self.scales

    def layout(self) -> dict[str, Any]:
        return {"bits": self.bits, "scale_rows": self.stored().size(0)}


@functools.cache
def e8p_gaussian_scales(bits: int) -> tuple[float, ...]:
    """Per stage, the scale (times the RMS) of least squared error for i.i.d. N(0, 1) weights: golden-section
    searches on a fixed sample of 2^13 codewords, stage 2 on the residual of stage 1."""
    x = torch.randn(32, 2048, generator=torch.Generator().manual_seed(0))

    def residual(scales: tuple[float, ...], b: int) -> Tensor:
        grid = E8PGrid(torch.tensor([scales] * x.size(0)), b)
        return x - grid.decode(grid.encode(x))

    first = golden_section(lambda s: float(residual((s,), 2).square().mean()), 0.2, 3.0, 30)
    if bits == 2:
        return (first,)
    if bits == 3:  # the least-squares scale of a sign code: E|r|
        return first, float(residual((first,), 2).abs().mean())
    return first, golden_section(lambda s: float(residual((first, s), 4).square().mean()), 0.01, 1.0, 30)


@register_codebook
class E8PCodebook(Codebook):
    """The E8P lattice codebook: ``bits`` 2 (E8P), 3 (E8P + the residual's signs) or 4 (E8P + E8P), one scale
    per stage and output row (``granularity="channel"``) or for the whole matrix (``"tensor"``): the row's
    (matrix's) RMS times :func:`e8p_gaussian_scales`. The layer's input size must be a multiple of 8."""

    name: ClassVar[str] = "e8p"
    format_version: ClassVar[int] = 1
    unit: ClassVar[tuple[int, int]] = (1, 8)
    SUPPORTED_BITS = (2, 3, 4)

    def __init__(self, bits: int = 2, granularity: Literal["tensor", "channel"] = "channel") -> None:
        if bits not in self.SUPPORTED_BITS:
            raise ValueError(f"E8PCodebook supports bits in {self.SUPPORTED_BITS} (2: E8P, 3 and 4: with a residual "
                             f"stage), got {bits}")
        if granularity not in ("tensor", "channel"):
            raise ValueError(f"E8PCodebook: granularity must be 'tensor' or 'channel', got {granularity!r}")
        self.bits, self.granularity = bits, granularity

    @classmethod
    def from_config(cls, config: Any) -> E8PCodebook:
        if config.group_size is not None:
            raise ValueError(f"quantizer 'e8p' has one scale per row or per tensor: group_size must be None, got "
                             f"{config.group_size}")
        if not config.symmetric:
            raise ValueError("quantizer 'e8p' is a symmetric lattice: symmetric=False applies to 'int' only")
        return cls(config.bits, config.scale)

    def __repr__(self) -> str:
        return f"E8PCodebook(bits={self.bits}, granularity={self.granularity!r})"

    def fit(self, W: Tensor) -> E8PGrid:
        if W.dim() != 2 or W.size(1) % 8:
            raise ValueError(f"E8PCodebook codes 8 input columns jointly: W must be 2-D with a multiple of 8 columns, "
                             f"got shape {tuple(W.shape)} (skip the layer with QuantConfig(skip=...) or use 'int')")
        return E8PGrid(rms_scale(W, self.granularity, e8p_gaussian_scales(self.bits), "E8PCodebook"), self.bits)

    # Storage: qweight ((m, n / 8 * bits) uint8: each unit's code in `bits` little-endian bytes), scales ((1 or m,
    # stages) fp16).

    @classmethod
    def create_weights(cls, layer: nn.Module, in_features: int, out_features: int, *, bits: int,
                       scale_rows: int) -> None:
        if bits not in cls.SUPPORTED_BITS:
            raise ValueError(f"E8P bits must be in {cls.SUPPORTED_BITS}, got {bits}")
        if in_features % 8:
            raise ValueError(f"E8P needs in_features to be a multiple of 8, got {in_features}")
        if scale_rows not in (1, out_features):
            raise ValueError(f"scale_rows ({scale_rows}) must be 1 or out_features ({out_features})")
        layer.register_buffer("qweight", torch.zeros(out_features, in_features // 8 * bits, dtype=torch.uint8))
        layer.register_buffer("scales", torch.ones(scale_rows, _stages(bits), dtype=torch.float16))

    @classmethod
    def pack(cls, layer: nn.Module, codes: Tensor, grid: E8PGrid) -> None:
        scales = grid.stored()
        if not torch.equal(scales.half().float(), scales):
            raise ValueError("the E8P codebook stores fp16 scales; these are not fp16 values")
        shifts = 8 * torch.arange(grid.bits, device=codes.device)
        stream = (codes.long().unsqueeze(-1) >> shifts) & 255
        layer.qweight.copy_(stream.reshape(codes.size(0), -1).to(torch.uint8))
        layer.scales.copy_(scales)

    @classmethod
    def unpack(cls, layer: nn.Module) -> tuple[Tensor, E8PGrid]:
        bits = layer.layout["bits"]
        stream = layer.qweight.long().reshape(layer.out_features, -1, bits)
        codes = (stream << (8 * torch.arange(bits, device=stream.device))).sum(-1)
        codes = torch.where(codes >= 2**31, codes - 2**32, codes).to(torch.int32)  # the bits of a uint32, as int32
        scales = layer.scales.float().expand(layer.out_features, _stages(bits))
        return codes, E8PGrid(scales, bits)

    @classmethod
    def check_values(cls, layer: nn.Module, name: str) -> None:
        if not bool((torch.isfinite(layer.scales) & (layer.scales > 0)).all()):
            raise ValueError(f"{name}.scales holds non-positive, NaN or infinite values; the file is corrupt: "
                             "quantize the model again")

    @classmethod
    def matmul(cls, layer: nn.Module, x: Tensor, rht: RHT | None) -> Tensor:
        """The fused op (codes decoded as they are used, the RHT inside) on a backend that has its kernel (CPU;
        CUDA in a CUDA build) when no gradient is needed; else the dequantized weight's matmul."""
        kernel = x.device.type == "cpu" or (x.device.type == "cuda" and WITH_CUDA)
        if kernel and not (torch.is_grad_enabled() and x.requires_grad):
            return ops.e8p_matmul(x, layer.qweight, layer.scales, e8p_abs_grid(x.device), layer.layout["bits"],
                                  *(() if rht is None else rht.fused_args(x.device)))
        return cls.dequantized_matmul(layer, x, rht)
