"""The quantized linear layer: a codebook's stored codes, RHT signs, optional low-rank term and channel scales;
``y = x W^T + b`` with ``W = diag(c) (S_V Had_m^T W_hat Had_n S_U) diag(1 / d) + A B`` (no RHT: ``W_hat``; no
column scale d or row scale c: 1; no low-rank term: 0) and ``W_hat`` the decoded codes (INT: ``(codes - z) * s``)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor, nn

from .bitpack import pack_codes, unpack_codes
from .codebooks import Codebook, Grid, get_codebook
from .hadamard import RHT
from .rounding import Rounded

__all__ = ["QuantizedLinear", "effective_weight"]

_FORMAT0_LAYOUT = ("bits", "group_size", "scale_rows", "zero_rows")
"""Format 0 (saved before codebooks had names) was INT only, its layout keys at the top level of the spec."""


def _state(*tensors: Tensor | None) -> tuple:
    """Identity and version of tensors: changes when one is replaced or written in place."""
    return tuple(None if t is None else (t.data_ptr(), t._version, t.device) for t in tensors)


def effective_weight(W_hat: Tensor, rht: RHT | None, in_scale: Tensor | None = None,
                     lowrank: tuple[Tensor, Tensor] | None = None, out_scale: Tensor | None = None) -> Tensor:
    """``W = diag(c) (S_V Had_m^T W_hat Had_n S_U) diag(1 / d) + A B`` (fp32, original basis) of a rounding result."""
    W = W_hat.float() if rht is None else rht.inverse_weight(W_hat.float())
    if in_scale is not None:
        W = W / in_scale.float()
    if out_scale is not None:
        W = W * out_scale.float()[:, None]
    if lowrank is not None:
        W = W + lowrank[0].float() @ lowrank[1].float()
    return W


class QuantizedLinear(nn.Module):
    """A drop-in replacement of ``nn.Linear`` (or GPT-2's ``Conv1D``) holding a quantized weight.

    The codebook (``codebook``, a name in :data:`yaqa_ext.codebooks.CODEBOOKS`, with its ``layout``) owns the
    weight's buffers and the matmul (INT: ``qweight`` packed codes, ``scales`` / ``zeros`` fp16). Besides them:
    with RHT ``sign_in`` / ``sign_out`` (one bit per sign, packed) plus the ``rht_seed`` that drew them; with a
    low-rank term ``lowrank_A`` (m x k) and ``lowrank_B`` (k x n), fp16; with an input-column scale
    ``in_scale`` (n, fp16: the weight was quantized as ``W diag(d)``); with an output-row scale ``out_scale``
    (m, fp16: the rows of the decoded weight are multiplied by it). Fine-tuning trains both scales (the RHT's
    signs relaxed to continuous per-channel scales, as in QuIP#).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        codebook: str,
        layout: dict[str, Any],
        rht: bool,
        bias: bool,
        rht_seed: int = 0,
        bias_dtype: torch.dtype | str = torch.float32,
        lowrank_rank: int = 0,
        in_scale: bool = False,
        format_version: int | None = None,
        out_scale: bool = False,
    ) -> None:
        """``format_version``: the codebook format ``layout`` was saved in (None: the current one)."""
        super().__init__()
        book = get_codebook(codebook)
        if format_version is not None and format_version != book.format_version:
            layout = book.upgrade_layout(dict(layout), format_version)
        self.in_features, self.out_features, self.rht_seed = in_features, out_features, rht_seed
        self.codebook, self.layout = codebook, dict(layout)
        try:
            book.create_weights(self, in_features, out_features, **self.layout)
        except TypeError as e:  # a layout of another codebook (an edited or mixed-up config.json)
            raise ValueError(f"codebook {codebook!r} cannot store a layer of layout {self.layout} ({e}); the saved "
                             "config does not match the codebook: quantize the model again") from e
        if rht:
            self.register_buffer("sign_in", torch.zeros(1, (in_features + 7) // 8, dtype=torch.uint8))
            self.register_buffer("sign_out", torch.zeros(1, (out_features + 7) // 8, dtype=torch.uint8))
        else:
            self.sign_in = self.sign_out = None
        if isinstance(bias_dtype, str):
            bias_dtype = getattr(torch, bias_dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype), requires_grad=False) if bias else None
        if lowrank_rank < 0:
            raise ValueError(f"lowrank_rank must be >= 0, got {lowrank_rank}")
        if lowrank_rank > 0:
            self.register_buffer("lowrank_A", torch.zeros(out_features, lowrank_rank, dtype=torch.float16))
            self.register_buffer("lowrank_B", torch.zeros(lowrank_rank, in_features, dtype=torch.float16))
        else:
            self.lowrank_A = self.lowrank_B = None
        if in_scale:
            self.register_buffer("in_scale", torch.ones(in_features, dtype=torch.float16))
        else:
            self.in_scale = None
        if out_scale:
            self.register_buffer("out_scale", torch.ones(out_features, dtype=torch.float16))
        else:
            self.out_scale = None

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> QuantizedLinear:
        """The empty layer of a saved ``spec`` (see :meth:`spec`), of the current format or an older one."""
        if "codebook" not in spec:
            spec = {**{k: v for k, v in spec.items() if k not in _FORMAT0_LAYOUT}, "codebook": "int",
                    "format_version": 0, "layout": {k: spec[k] for k in _FORMAT0_LAYOUT if k in spec}}
        return cls(**spec)

    @property
    def book(self) -> type[Codebook]:
        """The codebook class that stores and multiplies this layer's weight."""
        return get_codebook(self.codebook)

    @property
    def rht(self) -> RHT | None:
        """The layer's RHT, its sign vectors unpacked once and kept until a sign buffer is replaced or written."""
        if self.sign_in is None:
            return None
        key = _state(self.sign_out, self.sign_in) + (self.rht_seed,)
        cached = self.__dict__.get("_rht_cache")
        if cached is None or cached[0] != key:
            signs = [unpack_codes(s, 1, k)[0].float() * 2 - 1 for s, k in ((self.sign_out, self.out_features),
                                                                           (self.sign_in, self.in_features))]
            cached = self.__dict__["_rht_cache"] = (key, RHT.from_signs(*signs, self.rht_seed))
        return cached[1]

    @classmethod
    def from_rounding(
        cls,
        rounded: Rounded,
        grid: Grid,
        rht: RHT | None,
        bias: Tensor | None,
        lowrank: tuple[Tensor, Tensor] | None = None,
        in_scale: Tensor | None = None,
        channel_scales: bool = False,
    ) -> QuantizedLinear:
        """The layer of a rounding result on ``grid`` of the (RHT-transformed, column-scaled by ``in_scale``)
        weight, plus a low-rank term ``(A, B)`` (stored in fp16); ``channel_scales``: with both channel scales
        (``in_scale`` ones unless given, ``out_scale`` ones), for fine-tuning to train."""
        m, n = rounded.W_hat.shape
        layer = cls(n, m, grid.codebook, grid.layout(), rht is not None, bias is not None,
                    rht_seed=rht.seed if rht is not None else 0,
                    bias_dtype=bias.dtype if bias is not None else torch.float32,
                    lowrank_rank=0 if lowrank is None else lowrank[0].size(1),
                    in_scale=in_scale is not None or channel_scales, out_scale=channel_scales)
        layer.to(rounded.W_hat.device)
        layer.book.pack(layer, rounded.codes, grid)
        if rht is not None:
            layer.sign_in.copy_(pack_codes((rht.sign_in > 0).to(torch.uint8).unsqueeze(0), 1))
            layer.sign_out.copy_(pack_codes((rht.sign_out > 0).to(torch.uint8).unsqueeze(0), 1))
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        if layer.lowrank_A is not None:
            layer.lowrank_A.copy_(lowrank[0])
            layer.lowrank_B.copy_(lowrank[1])
        if in_scale is not None:
            if not torch.equal(in_scale.half().float(), in_scale.float()):
                raise ValueError("in_scale must hold fp16 values (it is stored in fp16)")
            layer.in_scale.copy_(in_scale)
        return layer

    def spec(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable) that rebuild this layer's empty shell."""
        return {
            "in_features": self.in_features, "out_features": self.out_features, "codebook": self.codebook,
            "format_version": self.book.format_version, "layout": dict(self.layout),
            "rht": self.sign_in is not None, "bias": self.bias is not None, "rht_seed": self.rht_seed,
            "bias_dtype": str(self.bias.dtype).removeprefix("torch.") if self.bias is not None else "float32",
            "lowrank_rank": 0 if self.lowrank_A is None else self.lowrank_A.size(1), "in_scale": self.in_scale is not None,
            "out_scale": self.out_scale is not None,
        }

    def check_buffers(self, name: str, spec: dict, missing: Collection[str] = ()) -> None:
        """Raise ValueError, naming the module, unless every buffer matches ``spec`` (the recorded constructor
        arguments) in presence (none in ``missing``, the buffers a loader did not find), shape and dtype, and
        the codebook's values, low-rank terms and column scales are finite (column scales > 0): what a loader
        must check before the layer computes anything."""
        with torch.device("meta"):
            shell = QuantizedLinear.from_spec(spec)
        fix = "the folder's weights and its config.json disagree: re-save it with save_pretrained or quantize again"
        for key, want in shell.named_buffers():
            have = getattr(self, key, None)
            if have is None or have.is_meta or key in missing:
                raise ValueError(f"{name}.{key} is missing from the loaded weights; {fix}")
            if have.shape != want.shape or have.dtype != want.dtype:
                raise ValueError(f"{name}.{key} is {have.dtype} {tuple(have.shape)} but the config's layer "
                                 f"({shell.codebook} {shell.layout}) needs {want.dtype} {tuple(want.shape)}; {fix}")
        if self.bias is not None and (self.bias.is_meta or self.bias.shape != (self.out_features,)):
            raise ValueError(f"{name}.bias is missing or not of shape ({self.out_features},); {fix}")
        self.book.check_values(self, name)
        for key, positive in (("lowrank_A", False), ("lowrank_B", False), ("in_scale", True), ("out_scale", False)):
            t = getattr(self, key)
            if t is not None and not bool((torch.isfinite(t) & ((t > 0) if positive else True)).all()):
                raise ValueError(f"{name}.{key} holds {'non-positive, ' if positive else ''}NaN or infinite values; "
                                 "the file is corrupt: quantize the model again")

    def process_weights_after_loading(self) -> None:
        """Let the codebook repack the loaded buffers for its kernels (called by the Hugging Face loader)."""
        self.book.process_weights_after_loading(self)

    def codes(self) -> Tensor:
        """The codes of the weight (INT: (m, n) uint8)."""
        return self.book.unpack(self)[0]

    def dequantized_weight(self) -> Tensor:
        """``W_hat``, the decoded codes (fp32, m x n), in the RHT basis when the layer has one."""
        codes, grid = self.book.unpack(self)
        return grid.decode(codes)

    def weight_matrix(self, lowrank: bool = True) -> Tensor:
        """The effective ``W`` (fp32, m x n) of ``y = x W^T + b``, in the original basis (with ``lowrank``
        False: without the low-rank term, i.e. the dequantized base weight)."""
        terms = (self.lowrank_A, self.lowrank_B) if lowrank and self.lowrank_A is not None else None
        return effective_weight(self.dequantized_weight(), self.rht, self.in_scale, terms, self.out_scale)

    @property
    def weight(self) -> Tensor:
        """The effective (out, in) fp32 weight (like ``nn.Linear.weight``, read-only), so code that inspects
        ``.weight`` (initialisers, dtype or shape checks) keeps working; computed on first access and kept
        until a buffer is replaced or written (``forward`` never uses it)."""
        key = _state(*self.buffers())
        cached = self.__dict__.get("_weight_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_weight_cache"] = (key, self.weight_matrix())
        return cached[1]

    def forward(self, x: Tensor) -> Tensor:
        xs = x if self.in_scale is None else (x.float() / self.in_scale.float()).to(x.dtype)  # fp16 x / 2^-14 overflows
        y = self.book.matmul(self, xs, self.rht)
        if self.out_scale is not None:
            y = y * self.out_scale.to(y.dtype)
        if self.lowrank_A is not None:
            y = y + (x @ self.lowrank_B.to(x.dtype).T) @ self.lowrank_A.to(x.dtype).T
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def bits_per_weight(self) -> float:
        """Stored bits of the weight (every buffer: codes, scales, signs, low-rank term, column scale; not the
        bias) per weight."""
        return sum(t.numel() * t.element_size() * 8 for t in self.buffers()) / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        rank = 0 if self.lowrank_A is None else self.lowrank_A.size(1)
        layout = ", ".join(f"{k}={v}" for k, v in self.layout.items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, codebook={self.codebook!r}, "
                f"{layout}, rht={self.sign_in is not None}, lowrank_rank={rank}, in_scale={self.in_scale is not None}, "
                f"out_scale={self.out_scale is not None}, "
                f"bias={self.bias is not None}")
