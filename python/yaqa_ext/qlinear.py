"""The quantized linear layer: bit-packed codes, grid scales, RHT signs, optional low-rank term;
``y = x W^T + b`` with ``W = (S_V Had_m^T W_hat Had_n S_U) diag(1 / d) + A B`` (no RHT: ``W_hat``; no
column scale d: 1; no low-rank term: 0) and ``W_hat = (codes - z) * s``."""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .codebooks import QuantParams
from .hadamard import RHT

__all__ = ["QuantizedLinear", "effective_weight", "pack_codes", "unpack_codes"]


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes (m, n) < 2^bits as a little-endian bit stream per row: (m, ceil(n / 8) * bits) bytes."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    m, n = codes.shape
    padded = F.pad(codes, (0, -n % 8))
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = (padded.unsqueeze(-1) >> shifts) & 1  # (m, n8, bits)
    stream = stream.reshape(m, -1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=codes.device)
    return (stream * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_codes`: the (m, n) uint8 codes."""
    m = packed.size(0)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(m, -1, bits)
    weights = (1 << torch.arange(bits, device=packed.device)).to(torch.int32)
    return (stream.to(torch.int32) * weights).sum(-1)[:, :n].to(torch.uint8)


def effective_weight(W_hat: Tensor, rht: RHT | None, in_scale: Tensor | None = None,
                     lowrank: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``W = (S_V Had_m^T W_hat Had_n S_U) diag(1 / d) + A B`` (fp32, original basis) of a rounding result."""
    W = W_hat.float() if rht is None else rht.inverse_weight(W_hat.float())
    if in_scale is not None:
        W = W / in_scale.float()
    if lowrank is not None:
        W = W + lowrank[0].float() @ lowrank[1].float()
    return W


class QuantizedLinear(nn.Module):
    """A drop-in replacement of ``nn.Linear`` (or GPT-2's ``Conv1D``) holding a quantized weight.

    Buffers: ``qweight`` (packed codes), ``scales`` / ``zeros`` (fp16, (1 or m, n / group_size): one row
    when every row is the same); with RHT ``sign_in`` / ``sign_out`` (one bit per sign, packed) plus the
    ``rht_seed`` that drew them; with a low-rank term ``lowrank_A`` (m x k) and ``lowrank_B`` (k x n),
    fp16; with an input-column scale ``in_scale`` (n, fp16: the weight was quantized as ``W diag(d)``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        scale_rows: int,
        zero_rows: int,
        rht: bool,
        bias: bool,
        rht_seed: int = 0,
        bias_dtype: torch.dtype | str = torch.float32,
        lowrank_rank: int = 0,
        in_scale: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {bits}")
        if group_size < 1 or in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        if scale_rows not in (1, out_features) or zero_rows not in (1, out_features):
            raise ValueError(f"scale_rows ({scale_rows}) and zero_rows ({zero_rows}) must be 1 or out_features ({out_features})")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.rht_seed = bits, group_size, rht_seed
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, (in_features + 7) // 8 * bits, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(scale_rows, groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(zero_rows, groups, dtype=torch.float16))
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

    @property
    def rht(self) -> RHT | None:
        """The layer's RHT, its sign vectors unpacked once and kept until a sign buffer is replaced or written."""
        if self.sign_in is None:
            return None
        key = tuple((b.data_ptr(), b._version, b.device) for b in (self.sign_out, self.sign_in)) + (self.rht_seed,)
        cached = self.__dict__.get("_rht_cache")
        if cached is None or cached[0] != key:
            signs = [unpack_codes(s, 1, k)[0].float() * 2 - 1 for s, k in ((self.sign_out, self.out_features),
                                                                           (self.sign_in, self.in_features))]
            cached = self.__dict__["_rht_cache"] = (key, RHT.from_signs(*signs, self.rht_seed))
        return cached[1]

    @classmethod
    def from_rounding(
        cls,
        codes: Tensor,
        params: QuantParams,
        rht: RHT | None,
        bias: Tensor | None,
        lowrank: tuple[Tensor, Tensor] | None = None,
        in_scale: Tensor | None = None,
    ) -> QuantizedLinear:
        """The layer of a rounding result: ``codes`` and ``params`` of the (RHT-transformed, column-scaled
        by ``in_scale``) weight, plus a low-rank term ``(A, B)`` (stored in fp16)."""
        m, n = codes.shape
        scales, zeros = (t[:1] if bool((t == t[:1]).all()) else t for t in (params.scales, params.zeros))
        if not (torch.equal(scales.half().float(), scales) and torch.equal(zeros.half().float(), zeros)):
            raise ValueError("QuantizedLinear stores fp16 scales and zero points; these are not fp16 values")
        layer = cls(n, m, params.bits, params.group_size, scales.size(0), zeros.size(0), rht is not None, bias is not None,
                    rht_seed=rht.seed if rht is not None else 0,
                    bias_dtype=bias.dtype if bias is not None else torch.float32,
                    lowrank_rank=0 if lowrank is None else lowrank[0].size(1), in_scale=in_scale is not None)
        layer.to(codes.device)
        layer.qweight.copy_(pack_codes(codes, params.bits))
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
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

    def spec(self) -> dict:
        """The constructor arguments (JSON-serialisable) that rebuild this layer's empty shell."""
        return {
            "in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
            "group_size": self.group_size, "scale_rows": self.scales.size(0), "zero_rows": self.zeros.size(0),
            "rht": self.sign_in is not None,
            "bias": self.bias is not None, "rht_seed": self.rht_seed,
            "bias_dtype": str(self.bias.dtype).removeprefix("torch.") if self.bias is not None else "float32",
            "lowrank_rank": 0 if self.lowrank_A is None else self.lowrank_A.size(1), "in_scale": self.in_scale is not None,
        }

    def check_buffers(self, name: str, spec: dict, missing: Collection[str] = ()) -> None:
        """Raise ValueError, naming the module, unless every buffer matches ``spec`` (the recorded constructor
        arguments) in presence (none in ``missing``, the buffers a loader did not find), shape and dtype, and
        scales, zero points, low-rank terms and column scales are finite (scales and column scales > 0): what a
        loader must check before the layer computes anything."""
        with torch.device("meta"):
            shell = QuantizedLinear(**spec)
        fix = "the folder's weights and its config.json disagree: re-save it with save_pretrained or quantize again"
        for key, want in shell.named_buffers():
            have = getattr(self, key, None)
            if have is None or have.is_meta or key in missing:
                raise ValueError(f"{name}.{key} is missing from the loaded weights; {fix}")
            if have.shape != want.shape or have.dtype != want.dtype:
                raise ValueError(f"{name}.{key} is {have.dtype} {tuple(have.shape)} but the config's layer "
                                 f"({spec['bits']}-bit, group_size {spec['group_size']}) needs {want.dtype} "
                                 f"{tuple(want.shape)}; {fix}")
        if self.bias is not None and (self.bias.is_meta or self.bias.shape != (self.out_features,)):
            raise ValueError(f"{name}.bias is missing or not of shape ({self.out_features},); {fix}")
        for key, positive in (("scales", True), ("zeros", False), ("lowrank_A", False), ("lowrank_B", False),
                              ("in_scale", True)):
            t = getattr(self, key)
            if t is not None and not bool((torch.isfinite(t) & ((t > 0) if positive else True)).all()):
                raise ValueError(f"{name}.{key} holds {'non-positive, ' if positive else ''}NaN or infinite values; "
                                 "the file is corrupt: quantize the model again")

    def codes(self) -> Tensor:
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def dequantized_weight(self) -> Tensor:
        """``W_hat = (codes - z) * s`` (fp32, m x n), in the RHT basis when the layer has one."""
        s = self.scales.float().repeat_interleave(self.group_size, dim=1)
        z = self.zeros.float().repeat_interleave(self.group_size, dim=1)
        return (self.codes().float() - z) * s

    def weight_matrix(self, lowrank: bool = True) -> Tensor:
        """The effective ``W`` (fp32, m x n) of ``y = x W^T + b``, in the original basis (with ``lowrank``
        False: without the low-rank term, i.e. the dequantized base weight)."""
        terms = (self.lowrank_A, self.lowrank_B) if lowrank and self.lowrank_A is not None else None
        return effective_weight(self.dequantized_weight(), self.rht, self.in_scale, terms)

    @property
    def weight(self) -> Tensor:
        """The effective (out, in) weight, computed on access (like ``nn.Linear.weight``, read-only); code
        that inspects ``.weight`` (initialisers, dtype or shape checks) keeps working."""
        return self.weight_matrix()

    def forward(self, x: Tensor) -> Tensor:
        xs = x if self.in_scale is None else (x.float() / self.in_scale.float()).to(x.dtype)  # fp16 x / 2^-14 overflows
        rht = self.rht
        y = self._codes_matmul(xs) if rht is None else rht.output_inverse(self._codes_matmul(rht.input_transform(xs)))
        if self.lowrank_A is not None:
            y = y + (x @ self.lowrank_B.to(x.dtype).T) @ self.lowrank_A.to(x.dtype).T
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _codes_matmul(self, x: Tensor) -> Tensor:
        """``x W_hat^T``: the fused op (codes decoded as they are used) on the CPU when no gradient is needed;
        else, until a backend has its kernel or the op a backward, the dequantized weight's matmul."""
        if x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
            return ops.int_matmul(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size)
        return x @ self.dequantized_weight().to(x.dtype).T

    def bits_per_weight(self) -> float:
        """Stored bits of the weight (codes, scales, zero points, signs, low-rank term, column scale; not the
        bias) per weight."""
        stored = [self.qweight, self.scales, self.zeros, self.sign_in, self.sign_out, self.lowrank_A, self.lowrank_B,
                  self.in_scale]
        stored = [t for t in stored if t is not None]
        return sum(t.numel() * t.element_size() * 8 for t in stored) / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        rank = 0 if self.lowrank_A is None else self.lowrank_A.size(1)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, rht={self.sign_in is not None}, lowrank_rank={rank}, "
                f"in_scale={self.in_scale is not None}, bias={self.bias is not None}")
