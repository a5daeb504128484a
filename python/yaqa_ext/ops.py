"""Typed wrappers and fake (meta) kernels for every ``torch.ops.yaqa`` operator.

The wrappers are thin: validation lives in the C++ kernels (``csrc/``), policy (damping,
retries, user-facing errors) in the concept modules such as :mod:`yaqa_ext.ldl`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the shared library that registers torch.ops.yaqa)

__all__ = ["block_ldl", "hadamard_transform"]


def block_ldl(H: Tensor, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``H = L blockdiag(D) L^T``: returns ``(L, D, info)``, info 0 / k (minor k not PD) / -1 (non-finite)."""
    return torch.ops.yaqa.block_ldl.default(H, block_size)


@torch.library.register_fake("yaqa::block_ldl")
def _block_ldl_fake(H: Tensor, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    torch._check(H.dim() == 2 and H.size(0) == H.size(1), lambda: f"block_ldl: H must be square, got {tuple(H.shape)}")
    torch._check(block_size >= 1 and H.size(0) % block_size == 0, lambda: "block_ldl: block_size must divide n")
    n = H.size(0)
    return (
        H.new_empty((n, n)),
        H.new_empty((n // block_size, block_size, block_size)),
        H.new_empty((), dtype=torch.int32),
    )


def hadamard_transform(x: Tensor, had: Tensor | None) -> Tensor:
    """``y = (Had_{2^k} ⊗ had) x / sqrt(n)`` along the last dimension (had: c x c +-1, fp32, or None)."""
    return torch.ops.yaqa.hadamard_transform.default(x, had)


@torch.library.register_fake("yaqa::hadamard_transform")
def _hadamard_transform_fake(x: Tensor, had: Tensor | None) -> Tensor:
    c = 1 if had is None else had.size(0)
    torch._check(x.dim() >= 1 and x.size(-1) % c == 0, lambda: "hadamard_transform: last dim of x must be 2^k * c")
    return torch.empty_like(x, memory_format=torch.contiguous_format)
