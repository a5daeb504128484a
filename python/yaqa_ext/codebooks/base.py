"""The codebook interface: how a weight matrix becomes codes (fit, encode, decode, adaptive rounding), how a
quantized layer stores them (create_weights, pack, unpack: a layout with a format version) and how it computes
``x W_hat^T`` from them (matmul); plus the registry that finds a codebook by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..hadamard import RHT

__all__ = ["CODEBOOKS", "Codebook", "Grid", "fp16_scale", "get_codebook", "golden_section", "register_codebook",
           "rms_scale"]


def fp16_scale(s: Tensor) -> Tensor:
    """fp16-exact scales (as stored); a zero one becomes the smallest normal fp16 value (levels ~1e-5 from 0)."""
    return s.clamp(2**-14, 65504.0).half().float()


def rms_scale(W: Tensor, granularity: str, factors: Tensor | float, codebook: str) -> Tensor:
    """Per row (``"channel"``) or for the whole matrix (``"tensor"``), the RMS of the finite weight W times
    ``factors`` (one per stage), as fp16 values: (m, stages)."""
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{codebook}: W has NaN or infinite entries; a codebook cannot represent them (check the "
                         "checkpoint, or skip the layer with QuantConfig(skip=...))")
    Wf = W.detach().float()
    rms = (Wf.square().mean() if granularity == "tensor" else Wf.square().mean(1)).sqrt()
    return fp16_scale(rms.expand(W.size(0)).unsqueeze(1) * torch.as_tensor(factors, device=W.device)).contiguous()


def golden_section(f: Callable[[float], float], lo: float, hi: float, iterations: int) -> float:
    """The minimiser of a unimodal ``f`` on [lo, hi] by golden-section search (the interval shrinks by 0.618 per
    iteration): the codebooks' Gaussian-optimal scales."""
    ratio = (5**0.5 - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = f(b)
    return (lo + hi) / 2


class Grid(ABC):
    """A codebook fitted to one weight matrix (its scales etc.): the nearest codes of values and back."""

    codebook: ClassVar[str]
    """Name of the codebook (in :data:`CODEBOOKS`) that stores this grid."""

    @abstractmethod
    def encode(self, W: Tensor) -> Tensor:
        """Codes of the nearest codewords of ``W`` (m, n): one code per codebook unit."""

    @abstractmethod
    def decode(self, codes: Tensor) -> Tensor:
        """The float32 (m, n) values of ``codes``."""

    @abstractmethod
    def ldlq_round(self, W: Tensor, L_in: Tensor | None, L_out: Tensor | None, td_x: int, td_y: int
                   ) -> tuple[Tensor, Tensor]:
        """Two-sided LDLQ on this grid (see :func:`yaqa_ext.ldlq_round`): ``(W_hat, codes)``."""

    @abstractmethod
    def layout(self) -> dict[str, Any]:
        """The JSON-serialisable shape of the stored layer (the keyword arguments of ``create_weights``)."""

    def scaled(self, factor: float) -> Grid:
        """The grid with every codeword multiplied by ``factor`` (as the layer stores it), for the scale search
        of adaptive rounding (``QuantConfig.rounding_scale_search``); codebooks without a scale do not have it."""
        raise NotImplementedError(f"codebook {self.codebook!r} has no scale to search: set rounding_scale_search=False")


class Codebook(ABC):
    """A quantiser: ``fit`` chooses a :class:`Grid` for a weight matrix; the class methods store one in a
    layer and compute with it. A new codebook is one subclass decorated with :func:`register_codebook`
    (plus its kernels); nothing else in the package names it."""

    name: ClassVar[str]
    format_version: ClassVar[int]
    """Version of the stored layout; a saved layer of a newer version is refused with a clear message."""
    unit: ClassVar[tuple[int, int]] = (1, 1)
    """(rows, columns) of weights coded jointly: rounding tiles are multiples of it."""
    bits: int

    @classmethod
    @abstractmethod
    def from_config(cls, config: Any) -> Codebook:
        """The codebook a :class:`yaqa_ext.QuantConfig` asks for (raises ValueError for bad settings)."""

    @abstractmethod
    def fit(self, W: Tensor) -> Grid:
        """The grid for the (m, n) weight ``W`` (from its unrounded values)."""

    @classmethod
    @abstractmethod
    def create_weights(cls, layer: nn.Module, in_features: int, out_features: int, **layout: Any) -> None:
        """Register the (empty) buffers of a layer of this layout on ``layer``."""

    @classmethod
    @abstractmethod
    def pack(cls, layer: nn.Module, codes: Tensor, grid: Grid) -> None:
        """Write ``codes`` and ``grid`` into the buffers of ``layer`` (made by ``create_weights(grid.layout())``)."""

    @classmethod
    @abstractmethod
    def unpack(cls, layer: nn.Module) -> tuple[Tensor, Grid]:
        """The codes and grid held by ``layer``'s buffers."""

    @classmethod
    @abstractmethod
    def check_values(cls, layer: nn.Module, name: str) -> None:
        """Raise ValueError naming ``name`` if a loaded buffer holds values no grid can have (NaN scales...)."""

    @classmethod
    @abstractmethod
    def matmul(cls, layer: nn.Module, x: Tensor, rht: RHT | None) -> Tensor:
        """The product in the layer's original basis from the stored codes (x: (..., in_features)): ``x W_hat^T``,
        or with an RHT ``rht.output_inverse(rht.input_transform(x) W_hat^T)`` (a kernel may fuse the transforms)."""

    @classmethod
    def dequantized_matmul(cls, layer: nn.Module, x: Tensor, rht: RHT | None) -> Tensor:
        """``matmul`` through the whole decoded weight (for backends without a kernel, and for gradients)."""
        codes, grid = cls.unpack(layer)
        W_hat = grid.decode(codes).to(x.dtype)
        return x @ W_hat.T if rht is None else rht.output_inverse(rht.input_transform(x) @ W_hat.T)

    @classmethod
    def process_weights_after_loading(cls, layer: nn.Module) -> None:
        """Repack the loaded buffers for this machine's kernels (after ``from_pretrained``); default: none."""

    @classmethod
    def upgrade_layout(cls, layout: dict[str, Any], version: int) -> dict[str, Any]:
        """The current layout of one saved in format ``version`` (default: only the current one loads)."""
        raise ValueError(f"codebook {cls.name!r}: the saved layer has format version {version}; this yaqa_ext reads "
                         f"version {cls.format_version}: quantize the model again with this version")


CODEBOOKS: dict[str, type[Codebook]] = {}
"""Registered codebooks by name (``QuantConfig(quantizer=name)``)."""


def register_codebook(cls: type[Codebook]) -> type[Codebook]:
    """Class decorator: make ``cls`` available as ``QuantConfig(quantizer=cls.name)`` and to the loader."""
    if cls.name in CODEBOOKS and CODEBOOKS[cls.name] is not cls:
        raise ValueError(f"a codebook named {cls.name!r} is already registered ({CODEBOOKS[cls.name].__qualname__})")
    CODEBOOKS[cls.name] = cls
    return cls


def get_codebook(name: str) -> type[Codebook]:
    """The registered codebook called ``name``."""
    if name not in CODEBOOKS:
        raise ValueError(f"unknown codebook {name!r}: the registered ones are {sorted(CODEBOOKS)} (a custom codebook "
                         "must be registered with yaqa_ext.codebooks.register_codebook before use or loading)")
    return CODEBOOKS[name]
