"""Typed wrappers and fake (meta) kernels for every ``torch.ops.yaqa`` operator.

The wrappers are thin: validation lives in the C++ kernels (``csrc/``), policy (damping,
retries, user-facing errors) in the concept modules such as :mod:`yaqa_ext.ldl`.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from . import _C  # noqa: F401  (loads the shared library that registers torch.ops.yaqa)
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"yaqa_ext's compiled extension yaqa_ext._C is missing or failed to load ({e}); build it with "
        "`bash .ci/setup` in the source tree, or `pip install -e . --no-build-isolation`"
    ) from e

__all__ = [
    "block_ldl",
    "hadamard_transform",
    "input_moment_update",
    "ldlq_round",
    "sketch_a_update",
    "sketch_b_update",
]


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


def sketch_b_update(
    X: Tensor,
    G: Tensor,
    H_in: Tensor,
    H_out: Tensor,
    P_in: Tensor | None = None,
    P_out: Tensor | None = None,
    allow_tf32: bool = False,
    contraction: str = "auto",
) -> None:
    """In place, with ``Gw_b = G_b^T X_b``: ``H_in += sum_b Gw_b^T P_out Gw_b``, ``H_out += sum_b Gw_b P_in Gw_b^T``.

    X (B, T, n) and G (B, T, m) are layer inputs and output gradients of B sequences; a missing P
    is the identity. Products in fp64 when X or G is fp64, else fp32 (TF32 on CUDA only with
    ``allow_tf32``); H fp32 or fp64. ``contraction``: ``"gradient"`` forms each ``Gw_b`` first,
    ``"gram"`` goes through the T x T Gram matrices (``H_in += X_b^T (G_b P_out G_b^T) X_b``),
    ``"auto"`` picks the one with fewer flops for each factor.
    """
    torch.ops.yaqa.sketch_b_update.default(X, G, H_in, H_out, P_in, P_out, allow_tf32, contraction)


def sketch_a_update(
    X: Tensor,
    G: Tensor,
    H_in: Tensor | None = None,
    H_out: Tensor | None = None,
    P_in: Tensor | None = None,
    P_out: Tensor | None = None,
    allow_tf32: bool = False,
) -> None:
    """In place, per token: ``H_in += (g_t P_out g_t^T) x_t^T x_t``, ``H_out += (x_t P_in x_t^T) g_t^T g_t``
    (products in fp64 when X or G is fp64, else fp32)."""
    torch.ops.yaqa.sketch_a_update.default(X, G, H_in, H_out, P_in, P_out, allow_tf32)


def input_moment_update(X: Tensor, H: Tensor, allow_tf32: bool = False) -> None:
    """In place: ``H += sum_t x_t^T x_t`` over every token of X (..., n) (fp64 products for fp64 X, else fp32)."""
    torch.ops.yaqa.input_moment_update.default(X, H, allow_tf32)


@torch.library.register_fake("yaqa::sketch_b_update")
def _sketch_b_update_fake(X, G, H_in, H_out, P_in=None, P_out=None, allow_tf32=False, contraction="auto") -> None:
    torch._check(X.dim() == 3 and G.dim() == 3, lambda: "sketch_b_update: X and G must be 3-D")
    torch._check(contraction in ("auto", "gradient", "gram"),
                 lambda: f"sketch_b_update: contraction must be 'auto', 'gradient' or 'gram', got {contraction!r}")
    return None


@torch.library.register_fake("yaqa::sketch_a_update")
def _sketch_a_update_fake(X, G, H_in=None, H_out=None, P_in=None, P_out=None, allow_tf32=False) -> None:
    return None


@torch.library.register_fake("yaqa::input_moment_update")
def _input_moment_update_fake(X, H, allow_tf32=False) -> None:
    return None


def ldlq_round(
    W: Tensor,
    L_in: Tensor | None,
    L_out: Tensor | None,
    scales: Tensor,
    zeros: Tensor,
    bits: int,
    group_size: int,
    td_x: int,
    td_y: int,
) -> tuple[Tensor, Tensor]:
    """Two-sided LDLQ of W on the grid ``(code - zeros) * scales``: returns ``(W_hat, codes)``; an absent
    factor is the identity."""
    return torch.ops.yaqa.ldlq_round.default(W, L_in, L_out, scales, zeros, bits, group_size, td_x, td_y)


@torch.library.register_fake("yaqa::ldlq_round")
def _ldlq_round_fake(W, L_in, L_out, scales, zeros, bits, group_size, td_x, td_y) -> tuple[Tensor, Tensor]:
    torch._check(W.dim() == 2, lambda: "ldlq_round: W must be 2-D")
    return W.new_empty(W.shape), W.new_empty(W.shape, dtype=torch.uint8)
