"""Bitshift trellis codes (after QTIP, arXiv 2406.11235; our construction): a 16 x 16 unit of weights (T = 256,
row-major) is one stream of k-bit symbols, ``k = bits``; weight t's state is the L-bit window of the stream
starting at bit k t (consecutive states share L - k bits) and its value is ``table[state] * s_row``. The encoder is an
exact Viterbi search over the 2^L states (csrc/trellis.h; on CUDA one thread block per unit). The stream is
tail-biting by default: the states of the last weights wrap around to the stream's first symbols, so a unit
stores exactly 256 symbols (``k`` bits per weight); the search holds the path's two ends to the bits they share,
taken from the best path across the wrap (the unit's last 32 weights then its first 32; QTIP rotates the whole
unit), which costs a quarter more search. Without tail-biting the stream starts with
(L - k) / k symbols of its own: ``k + (L - k) / 256`` bits per weight, e.g. 2.04 at 2 bits, L = 12. In memory
(``ldlq_round`` / ``decode``) codes are always the 256 + (L - k) / k symbols (tail-biting: the last ones repeat the
first).

The state values are the 2^L Gaussian quantiles ``Phi^-1((i + 1/2) / 2^L)`` placed in a pseudo-random order (the
order of the multiplicative hash ``state * 2654435761 mod 2^32``), so the marginal is exactly Gaussian and
neighbouring states are unrelated. Measured on N(0, 1) weights (2 bits, L = 12): MSE 0.070 per weight, against
0.092 for E8P and 0.1175 for the best scalar quantizer. Decoding is one lookup in a 16 KB table per weight
(``trellis_matmul``, CPU and CUDA)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from .. import ops
from .._C import WITH_CUDA
from ..bitpack import pack_codes, unpack_codes
from ..hadamard import RHT
from .base import Codebook, Grid, fp16_scale, golden_section, register_codebook, rms_scale

__all__ = ["TrellisCodebook", "TrellisGrid", "trellis_table"]

UNIT = 16
LENGTH = UNIT * UNIT


@functools.cache
def _table_cpu(L: int) -> Tensor:
    states = torch.arange(2**L, dtype=torch.int64)
    order = torch.argsort((states * 2654435761) & 0xFFFFFFFF)
    quantiles = torch.special.ndtri((torch.arange(2**L, dtype=torch.float64) + 0.5) / 2**L)
    table = torch.empty(2**L, dtype=torch.float64)
    table[order] = quantiles
    return table.float()


@functools.cache
def trellis_table(L: int, device: torch.device | str = "cpu") -> Tensor:
    """The 2^L float32 state values on ``device``."""
    return _table_cpu(L).to(device)


def start_symbols(L: int, bits: int) -> int:
    return (L - bits) // bits


def decode_values(symbols: Tensor, L: int, bits: int, m: int, n: int) -> Tensor:
    """The unscaled (m, n) values of per-unit symbol rows ((m / 16) (n / 16), 256 + start) uint8."""
    p = start_symbols(L, bits)
    windows = symbols.long().unfold(1, p + 1, 1)  # (units, 256, p + 1): stream symbols t .. t + p
    shifts = bits * torch.arange(p + 1, device=symbols.device)
    states = (windows << shifts).sum(-1)
    values = trellis_table(L, symbols.device)[states]  # (units, 256)
    return values.reshape(m // UNIT, n // UNIT, UNIT, UNIT).permute(0, 2, 1, 3).reshape(m, n)


@dataclass(frozen=True)
class TrellisGrid(Grid):
    """One scale per row; ``L``-bit states; ``bits`` bits per symbol (and per weight); tail-biting streams or not."""

    codebook: ClassVar[str] = "trellis"

    scales: Tensor
    """(m, 1) float32 fp16 values, > 0."""
    bits: int
    L: int
    tail_biting: bool = True

    def encode(self, W: Tensor) -> Tensor:
        return self.ldlq_round(W.float(), None, None, UNIT, UNIT)[1]

    def decode(self, codes: Tensor) -> Tensor:
        m = self.scales.size(0)
        n = codes.size(0) * LENGTH // m
        return decode_values(codes, self.L, self.bits, m, n) * self.scales

    def ldlq_round(self, W: Tensor, L_in: Tensor | None, L_out: Tensor | None, td_x: int, td_y: int
                   ) -> tuple[Tensor, Tensor]:
        """On W's device: the CPU runs a unit's Viterbi search per thread, CUDA on a thread block."""
        return ops.ldlq_round_trellis(W, L_in, L_out, self.scales.to(W.device), trellis_table(self.L, W.device),
                                      self.bits, td_x, td_y, self.tail_biting)

    def scaled(self, factor: float) -> TrellisGrid:
        return replace(self, scales=fp16_scale(self.scales * factor))

    def layout(self) -> dict[str, Any]:
        return {"bits": self.bits, "L": self.L, "tail_biting": self.tail_biting}


@functools.cache
def trellis_gaussian_scale(bits: int, L: int, tail_biting: bool) -> float:
    """The scale (times the RMS) of least squared error for i.i.d. N(0, 1) weights (golden-section search on a fixed
    sample of 16 units)."""
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))

    def err(s: float) -> float:
        grid = TrellisGrid(torch.full((64, 1), s), bits, L, tail_biting)
        return float((grid.decode(grid.encode(x)) - x).square().mean())

    return golden_section(err, 0.5, 1.5, 16)


@register_codebook
class TrellisCodebook(Codebook):
    """Bitshift trellis codes of ``bits`` (1-4) bits per weight with ``L``-bit states (default 12: a 16 KB value
    table, 2^12 states searched per weight), one scale per output row (``"channel"``) or per matrix (``"tensor"``):
    the RMS times :func:`trellis_gaussian_scale`; tail-biting streams unless ``tail_biting=False``. Layer sizes must be
    multiples of 16."""

    name: ClassVar[str] = "trellis"
    format_version: ClassVar[int] = 2
    unit: ClassVar[tuple[int, int]] = (UNIT, UNIT)
    SUPPORTED_BITS = (1, 2, 3, 4)

    def __init__(self, bits: int = 2, granularity: Literal["tensor", "channel"] = "channel", L: int = 12,
                 tail_biting: bool = True) -> None:
        if bits not in self.SUPPORTED_BITS:
            raise ValueError(f"TrellisCodebook supports bits in {self.SUPPORTED_BITS}, got {bits}")
        if granularity not in ("tensor", "channel"):
            raise ValueError(f"TrellisCodebook: granularity must be 'tensor' or 'channel', got {granularity!r}")
        if not (bits < L <= 20 and L % bits == 0):
            raise ValueError(f"TrellisCodebook: L ({L}) must be a multiple of bits ({bits}) above it, at most 20 "
                             "(12 divides by 1, 2, 3 and 4)")
        self.bits, self.granularity, self.L, self.tail_biting = bits, granularity, L, tail_biting

    @classmethod
    def from_config(cls, config: Any) -> TrellisCodebook:
        if config.group_size is not None:
            raise ValueError(f"quantizer 'trellis' has one scale per row or per tensor: group_size must be None, got "
                             f"{config.group_size}")
        if not config.symmetric:
            raise ValueError("quantizer 'trellis' is symmetric: symmetric=False applies to 'int' only")
        return cls(config.bits, config.scale)

    def __repr__(self) -> str:
        return (f"TrellisCodebook(bits={self.bits}, granularity={self.granularity!r}, L={self.L}, "
                f"tail_biting={self.tail_biting})")

    def fit(self, W: Tensor) -> TrellisGrid:
        if W.dim() != 2 or W.size(0) % UNIT or W.size(1) % UNIT:
            raise ValueError(f"TrellisCodebook codes 16 x 16 units: W must be 2-D with sizes that are multiples of 16, "
                             f"got shape {tuple(W.shape)} (skip the layer with QuantConfig(skip=...) or use 'int')")
        scale = trellis_gaussian_scale(self.bits, self.L, self.tail_biting)
        return TrellisGrid(rms_scale(W, self.granularity, scale, "TrellisCodebook"), self.bits, self.L, self.tail_biting)

    # Storage (format 2): qweight ((m / 16) (n / 16) units, ceil(symbols / 8) * bits) uint8: each unit's symbols as a
    # bit stream, 256 symbols when tail-biting, else 256 + (L - bits) / bits; scales (m, 1) fp16. Format 1 had no
    # tail-biting.

    @classmethod
    def create_weights(cls, layer: nn.Module, in_features: int, out_features: int, *, bits: int, L: int,
                       tail_biting: bool) -> None:
        if in_features % UNIT or out_features % UNIT:
            raise ValueError(f"trellis layers need sizes that are multiples of 16, got {out_features} x {in_features}")
        symbols = LENGTH + (0 if tail_biting else start_symbols(L, bits))
        units = (out_features // UNIT) * (in_features // UNIT)
        layer.register_buffer("qweight", torch.zeros(units, (symbols + 7) // 8 * bits, dtype=torch.uint8))
        layer.register_buffer("scales", torch.ones(out_features, 1, dtype=torch.float16))

    @classmethod
    def pack(cls, layer: nn.Module, codes: Tensor, grid: TrellisGrid) -> None:
        if not torch.equal(grid.scales.half().float(), grid.scales):
            raise ValueError("the trellis codebook stores fp16 scales; these are not fp16 values")
        p = start_symbols(grid.L, grid.bits)
        if grid.tail_biting and not torch.equal(codes[:, LENGTH:], codes[:, :p]):
            raise ValueError("tail-biting trellis codes must end with their first (L - bits) / bits symbols")
        layer.qweight.copy_(pack_codes(codes[:, :LENGTH] if grid.tail_biting else codes, grid.bits))
        layer.scales.copy_(grid.scales)

    @classmethod
    def unpack(cls, layer: nn.Module) -> tuple[Tensor, TrellisGrid]:
        bits, L, tail_biting = layer.layout["bits"], layer.layout["L"], layer.layout["tail_biting"]
        p = start_symbols(L, bits)
        if tail_biting:
            stored = unpack_codes(layer.qweight, bits, LENGTH)
            codes = torch.cat([stored, stored[:, :p]], 1)
        else:
            codes = unpack_codes(layer.qweight, bits, LENGTH + p)
        return codes, TrellisGrid(layer.scales.float(), bits, L, tail_biting)

    @classmethod
    def upgrade_layout(cls, layout: dict[str, Any], version: int) -> dict[str, Any]:
        """Format 1 stored the same buffers without tail-biting."""
        if version == 1:
            return {**layout, "tail_biting": False}
        return super().upgrade_layout(layout, version)

    @classmethod
    def check_values(cls, layer: nn.Module, name: str) -> None:
        if not bool((torch.isfinite(layer.scales) & (layer.scales > 0)).all()):
            raise ValueError(f"{name}.scales holds non-positive, NaN or infinite values; the file is corrupt: "
                             "quantize the model again")

    @classmethod
    def matmul(cls, layer: nn.Module, x: Tensor, rht: RHT | None) -> Tensor:
        """The fused op (states decoded as they are used, the RHT inside) on a backend that has its kernel (CPU;
        CUDA in a CUDA build) when no gradient is needed; else the dequantized weight's matmul."""
        kernel = x.device.type == "cpu" or (x.device.type == "cuda" and WITH_CUDA)
        if kernel and not (torch.is_grad_enabled() and x.requires_grad):
            return ops.trellis_matmul(x, layer.qweight, layer.scales, trellis_table(layer.layout["L"], x.device),
                                      layer.layout["bits"], *(() if rht is None else rht.fused_args(x.device)))
        return cls.dequantized_matmul(layer, x, rht)
