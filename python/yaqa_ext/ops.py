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
    "e8p_matmul",
    "hadamard_transform",
    "int_matmul",
    "input_moment_update",
    "ldlq_round",
    "ldlq_round_e8p",
    "ldlq_round_trellis",
    "sketch_a_update",
    "sketch_b_update",
    "trellis_matmul",
]


_ACTIVATIONS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ACCUMULATORS = (torch.float32, torch.float64)


def _check_dtypes(op: str, allowed: tuple[torch.dtype, ...], **tensors: Tensor | None) -> None:
    """The real kernels' dtype checks, repeated by the fake ones."""
    for name, t in tensors.items():
        if t is not None:
            names = " or ".join(str(d).removeprefix("torch.") for d in allowed)
            torch._check(t.dtype in allowed, lambda: f"{op}: {name} must be {names}, got {t.dtype}")


def _check_devices(op: str, **tensors: Tensor | None) -> None:
    """The fake kernels' device check (the real kernels check the same): every tensor on one device."""
    present = {k: t.device for k, t in tensors.items() if t is not None}
    first = next(iter(present.items()))
    for name, device in present.items():
        torch._check(device == first[1], lambda: f"{op}: {first[0]} is on {first[1]} but {name} is on {device}; "
                     "move both to one device")


def _check_square(op: str, name: str, t: Tensor | None, size: int) -> None:
    if t is not None:
        torch._check(t.dim() == 2 and t.size(0) == size and t.size(1) == size,
                     lambda: f"{op}: {name} must be {size} x {size}, got {tuple(t.shape)}")


def block_ldl(H: Tensor, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``H = L blockdiag(D) L^T``: returns ``(L, D, info)``, info 0 / k (minor k not PD) / -1 (non-finite)."""
    return torch.ops.yaqa.block_ldl.default(H, block_size)


@torch.library.register_fake("yaqa::block_ldl")
def _block_ldl_fake(H: Tensor, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    torch._check(H.dim() == 2 and H.size(0) == H.size(1), lambda: f"block_ldl: H must be square, got {tuple(H.shape)}")
    _check_dtypes("block_ldl", _ACCUMULATORS, H=H)
    torch._check(H.size(0) > 0, lambda: "block_ldl: H is empty (0 x 0)")
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
    torch._check(x.dim() >= 1 and x.size(-1) > 0, lambda: "hadamard_transform: x must have a non-empty last dimension")
    if had is not None:
        torch._check(had.dim() == 2 and had.size(0) == had.size(1) and had.size(0) >= 1,
                     lambda: f"hadamard_transform: had must be a non-empty square matrix, got {tuple(had.shape)}")
        torch._check(had.device == x.device, lambda: f"hadamard_transform: x is on {x.device} but had on {had.device}")
    c = 1 if had is None else had.size(0)
    p = x.size(-1) // c
    torch._check(x.size(-1) % c == 0 and p & (p - 1) == 0, lambda: "hadamard_transform: last dim of x must be 2^k * c")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _hadamard_transform_setup(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.had = inputs[1]


def _hadamard_transform_backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
    """The transform is the orthogonal map (Had_{2^k} ⊗ had) / sqrt(n); its adjoint uses had^T."""
    had_t = None if ctx.had is None else ctx.had.t().contiguous()
    return torch.ops.yaqa.hadamard_transform.default(grad, had_t), None


torch.library.register_autograd("yaqa::hadamard_transform", _hadamard_transform_backward,
                                setup_context=_hadamard_transform_setup)


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


def _check_sketch_fake(op: str, X: Tensor, G: Tensor, H_in, H_out, P_in, P_out) -> None:
    _check_dtypes(op, _ACTIVATIONS, X=X, G=G)
    _check_dtypes(op, _ACCUMULATORS, H_in=H_in, H_out=H_out, P_in=P_in, P_out=P_out)
    torch._check(X.dim() >= 1 and X.shape[:-1] == G.shape[:-1],
                 lambda: f"{op}: X {tuple(X.shape)} and G {tuple(G.shape)} must agree in every dimension but the last")
    n, m = X.size(-1), G.size(-1)
    for name, t, size in (("H_in", H_in, n), ("H_out", H_out, m), ("P_in", P_in, n), ("P_out", P_out, m)):
        _check_square(op, name, t, size)
    _check_devices(op, X=X, G=G, H_in=H_in, H_out=H_out, P_in=P_in, P_out=P_out)


@torch.library.register_fake("yaqa::sketch_b_update")
def _sketch_b_update_fake(X, G, H_in, H_out, P_in=None, P_out=None, allow_tf32=False, contraction="auto") -> None:
    torch._check(X.dim() == 3 and G.dim() == 3, lambda: "sketch_b_update: X and G must be 3-D")
    torch._check(contraction in ("auto", "gradient", "gram"),
                 lambda: f"sketch_b_update: contraction must be 'auto', 'gradient' or 'gram', got {contraction!r}")
    _check_sketch_fake("sketch_b_update", X, G, H_in, H_out, P_in, P_out)
    return None


@torch.library.register_fake("yaqa::sketch_a_update")
def _sketch_a_update_fake(X, G, H_in=None, H_out=None, P_in=None, P_out=None, allow_tf32=False) -> None:
    _check_sketch_fake("sketch_a_update", X, G, H_in, H_out, P_in, P_out)
    return None


@torch.library.register_fake("yaqa::input_moment_update")
def _input_moment_update_fake(X, H, allow_tf32=False) -> None:
    _check_dtypes("input_moment_update", _ACTIVATIONS, X=X)
    _check_dtypes("input_moment_update", _ACCUMULATORS, H=H)
    torch._check(X.dim() >= 1, lambda: "input_moment_update: X must have a feature dimension")
    _check_square("input_moment_update", "H", H, X.size(-1))
    _check_devices("input_moment_update", X=X, H=H)
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
    torch._check(W.dim() == 2 and W.dtype == torch.float32, lambda: "ldlq_round: W must be a 2-D float32 matrix")
    m, n = W.shape
    torch._check(m * n > 0, lambda: f"ldlq_round: W must be non-empty, got shape {tuple(W.shape)}")
    _check_dtypes("ldlq_round", (torch.float32,), L_in=L_in, L_out=L_out, scales=scales, zeros=zeros)
    torch._check(td_x * td_y <= 1024, lambda: f"ldlq_round: td_x * td_y = {td_x * td_y} must be <= 1024")
    torch._check(1 <= bits <= 8, lambda: f"ldlq_round: bits must be in 1..8, got {bits}")
    torch._check(td_x >= 1 and td_y >= 1 and m % td_x == 0 and n % td_y == 0,
                 lambda: f"ldlq_round: W is {m} x {n}, not divisible into {td_x} x {td_y} tiles")
    torch._check(group_size >= 1 and n % group_size == 0, lambda: f"ldlq_round: group_size {group_size} must divide {n}")
    _check_square("ldlq_round", "L_in", L_in, n)
    _check_square("ldlq_round", "L_out", L_out, m)
    for name, t in (("scales", scales), ("zeros", zeros)):
        torch._check(tuple(t.shape) == (m, n // group_size),
                     lambda: f"ldlq_round: {name} must be ({m}, {n // group_size}), got {tuple(t.shape)}")
    _check_devices("ldlq_round", W=W, L_in=L_in, L_out=L_out, scales=scales, zeros=zeros)
    return W.new_empty(W.shape), W.new_empty(W.shape, dtype=torch.uint8)


def ldlq_round_e8p(W: Tensor, L_in: Tensor | None, L_out: Tensor | None, scales: Tensor, abs_grid: Tensor, bits: int,
                   td_x: int, td_y: int) -> tuple[Tensor, Tensor]:
    """Two-sided LDLQ of W on the E8P lattice codebook (8 columns per code; ``bits`` 2, 3 or 4 with a residual
    stage), scales (m, stages): returns ``(W_hat, codes)``, codes int32 (m, n / 8)."""
    return torch.ops.yaqa.ldlq_round_e8p.default(W, L_in, L_out, scales, abs_grid, bits, td_x, td_y)


def _e8p_stages(op: str, bits: int) -> int:
    torch._check(2 <= bits <= 4, lambda: f"{op}: the E8P codebook has 2, 3 or 4 bits per weight, got {bits}")
    return 1 if bits == 2 else 2


def _check_e8p_grid(op: str, abs_grid: Tensor) -> None:
    _check_dtypes(op, (torch.float32,), abs_grid=abs_grid)
    torch._check(tuple(abs_grid.shape) == (256, 8), lambda: f"{op}: abs_grid must be (256, 8), got {tuple(abs_grid.shape)}")


@torch.library.register_fake("yaqa::ldlq_round_e8p")
def _ldlq_round_e8p_fake(W, L_in, L_out, scales, abs_grid, bits, td_x, td_y) -> tuple[Tensor, Tensor]:
    op = "ldlq_round_e8p"
    stages = _e8p_stages(op, bits)
    torch._check(W.dim() == 2 and W.dtype == torch.float32, lambda: f"{op}: W must be a 2-D float32 matrix")
    m, n = W.shape
    torch._check(m * n > 0, lambda: f"{op}: W must be non-empty, got shape {tuple(W.shape)}")
    _check_dtypes(op, (torch.float32,), L_in=L_in, L_out=L_out, scales=scales)
    torch._check(td_x >= 1 and td_y >= 1 and td_x * td_y <= 1024 and m % td_x == 0 and n % td_y == 0,
                 lambda: f"{op}: W is {m} x {n}, not divisible into {td_x} x {td_y} tiles (td_x * td_y <= 1024)")
    torch._check(n % 8 == 0 and td_y % 8 == 0, lambda: f"{op}: n ({n}) and td_y ({td_y}) must be multiples of 8")
    _check_square(op, "L_in", L_in, n)
    _check_square(op, "L_out", L_out, m)
    torch._check(tuple(scales.shape) == (m, stages), lambda: f"{op}: scales must be ({m}, {stages}), got {tuple(scales.shape)}")
    _check_e8p_grid(op, abs_grid)
    _check_devices(op, W=W, L_in=L_in, L_out=L_out, scales=scales, abs_grid=abs_grid)
    return W.new_empty(W.shape), W.new_empty((m, n // 8), dtype=torch.int32)


def ldlq_round_trellis(W: Tensor, L_in: Tensor | None, L_out: Tensor | None, scales: Tensor, table: Tensor,
                       bits: int, td_x: int, td_y: int, tail_biting: bool = False) -> tuple[Tensor, Tensor]:
    """Two-sided LDLQ of W with bitshift trellis codes on 16 x 16 units (Viterbi per unit), state values ``table``
    (2^L), scales (m, 1): returns ``(W_hat, codes)``, codes uint8 (units, 256 + (L - bits) / bits) symbols;
    ``tail_biting``: each unit's last (L - bits) / bits symbols repeat its first ones."""
    return torch.ops.yaqa.ldlq_round_trellis.default(W, L_in, L_out, scales, table, bits, td_x, td_y, tail_biting)


@torch.library.register_fake("yaqa::ldlq_round_trellis")
def _ldlq_round_trellis_fake(W, L_in, L_out, scales, table, bits, td_x, td_y, tail_biting=False
                             ) -> tuple[Tensor, Tensor]:
    op = "ldlq_round_trellis"
    torch._check(W.dim() == 2 and W.dtype == torch.float32, lambda: f"{op}: W must be a 2-D float32 matrix")
    m, n = W.shape
    torch._check(m * n > 0 and m % 16 == 0 and n % 16 == 0 and td_x % 16 == 0 and td_y % 16 == 0 and td_x * td_y <= 1024
                 and m % td_x == 0 and n % td_y == 0,
                 lambda: f"{op}: m ({m}), n ({n}), td_x ({td_x}), td_y ({td_y}) must be multiples of 16 (tiles dividing W)")
    torch._check(1 <= bits <= 4, lambda: f"{op}: bits must be in 1..4, got {bits}")
    _check_dtypes(op, (torch.float32,), L_in=L_in, L_out=L_out, scales=scales, table=table)
    size = table.numel()
    L = size.bit_length() - 1
    torch._check(table.dim() == 1 and size == 2**L and L > bits and L % bits == 0 and L <= 20,
                 lambda: f"{op}: table must hold 2^L state values, L a multiple of bits above it, got {tuple(table.shape)}")
    _check_square(op, "L_in", L_in, n)
    _check_square(op, "L_out", L_out, m)
    torch._check(tuple(scales.shape) == (m, 1), lambda: f"{op}: scales must be ({m}, 1), got {tuple(scales.shape)}")
    _check_devices(op, W=W, L_in=L_in, L_out=L_out, scales=scales, table=table)
    return W.new_empty(W.shape), W.new_empty(((m // 16) * (n // 16), 256 + (L - bits) // bits), dtype=torch.uint8)


def _check_rht_args(op: str, m: int, n: int, sign_in: Tensor | None, had_in: Tensor | None, sign_out: Tensor | None,
                    had_out: Tensor | None) -> None:
    for sign, had, size, name in ((sign_in, had_in, n, "sign_in"), (sign_out, had_out, m, "sign_out")):
        torch._check(sign is not None or had is None,
                     lambda: f"{op}: a Hadamard factor was given without {name}; pass the RHT's sign vector with it")
        if sign is not None:
            _check_dtypes(op, (torch.float32,), **{name: sign})
            torch._check(sign.dim() == 1 and sign.size(0) == size,
                         lambda: f"{op}: {name} must be a vector of {size} signs, got {tuple(sign.shape)}")


def e8p_matmul(x: Tensor, qweight: Tensor, scales: Tensor, abs_grid: Tensor, bits: int, sign_in: Tensor | None = None,
               had_in: Tensor | None = None, sign_out: Tensor | None = None, had_out: Tensor | None = None) -> Tensor:
    """``x W_hat^T`` for the packed E8P weight (codes of :func:`ldlq_round_e8p`, ``bits`` bytes per 8 weights),
    decoded as it is used; the optional RHT around it as in :func:`int_matmul`."""
    return torch.ops.yaqa.e8p_matmul.default(x, qweight, scales, abs_grid, bits, sign_in, had_in, sign_out, had_out)


@torch.library.register_fake("yaqa::e8p_matmul")
def _e8p_matmul_fake(x, qweight, scales, abs_grid, bits, sign_in=None, had_in=None, sign_out=None, had_out=None):
    op = "e8p_matmul"
    stages = _e8p_stages(op, bits)
    _check_dtypes(op, _ACTIVATIONS, x=x)
    _check_dtypes(op, (torch.uint8,), qweight=qweight)
    _check_dtypes(op, (torch.float16, torch.float32), scales=scales)
    torch._check(x.dim() >= 1 and x.size(-1) > 0 and x.size(-1) % 8 == 0,
                 lambda: f"{op}: x's last dimension must be a positive multiple of 8, got shape {tuple(x.shape)}")
    n = x.size(-1)
    torch._check(qweight.dim() == 2 and qweight.size(0) > 0 and qweight.size(1) == n // 8 * bits,
                 lambda: f"{op}: qweight must be (m, n / 8 * bits), got {tuple(qweight.shape)}")
    m = qweight.size(0)
    torch._check(scales.dim() == 2 and scales.size(0) in (1, m) and scales.size(1) == stages,
                 lambda: f"{op}: scales must be (1 or m, {stages}), got {tuple(scales.shape)}")
    _check_e8p_grid(op, abs_grid)
    _check_rht_args(op, m, n, sign_in, had_in, sign_out, had_out)
    _check_devices(op, x=x, qweight=qweight, scales=scales, abs_grid=abs_grid, sign_in=sign_in, had_in=had_in,
                   sign_out=sign_out, had_out=had_out)
    return x.new_empty((*x.shape[:-1], m))


def trellis_matmul(x: Tensor, qweight: Tensor, scales: Tensor, table: Tensor, bits: int, sign_in: Tensor | None = None,
                   had_in: Tensor | None = None, sign_out: Tensor | None = None, had_out: Tensor | None = None) -> Tensor:
    """``x W_hat^T`` for the packed trellis weight (the symbol streams of :func:`ldlq_round_trellis`), decoded a row
    block of 16 at a time; the optional RHT around it as in :func:`int_matmul`."""
    return torch.ops.yaqa.trellis_matmul.default(x, qweight, scales, table, bits, sign_in, had_in, sign_out, had_out)


@torch.library.register_fake("yaqa::trellis_matmul")
def _trellis_matmul_fake(x, qweight, scales, table, bits, sign_in=None, had_in=None, sign_out=None, had_out=None):
    op = "trellis_matmul"
    _check_dtypes(op, _ACTIVATIONS, x=x)
    _check_dtypes(op, (torch.uint8,), qweight=qweight)
    _check_dtypes(op, (torch.float16, torch.float32), scales=scales)
    _check_dtypes(op, (torch.float32,), table=table)
    torch._check(1 <= bits <= 4, lambda: f"{op}: bits must be in 1..4, got {bits}")
    size = table.numel()
    L = size.bit_length() - 1
    torch._check(table.dim() == 1 and size == 2**L and L > bits and L % bits == 0 and L <= 20,
                 lambda: f"{op}: table must hold 2^L state values, L a multiple of bits above it, got {tuple(table.shape)}")
    torch._check(scales.dim() == 2 and scales.size(0) > 0 and scales.size(1) == 1,
                 lambda: f"{op}: scales must be (m, 1), got {tuple(scales.shape)}")
    m, n = scales.size(0), x.size(-1)
    torch._check(x.dim() >= 1 and n > 0 and n % 16 == 0 and m % 16 == 0,
                 lambda: f"{op}: n ({n}) and m ({m}) must be multiples of 16")
    units, unit_bytes = (m // 16) * (n // 16), (256 + (L - bits) // bits + 7) // 8 * bits  # tail-biting: 32 bits
    torch._check(qweight.dim() == 2 and qweight.shape[0] == units and qweight.shape[1] in (unit_bytes, 32 * bits),
                 lambda: f"{op}: qweight must be ({units}, {unit_bytes}) or, tail-biting, ({units}, {32 * bits}), "
                         f"got {tuple(qweight.shape)}")
    _check_rht_args(op, m, n, sign_in, had_in, sign_out, had_out)
    _check_devices(op, x=x, qweight=qweight, scales=scales, table=table, sign_in=sign_in, had_in=had_in,
                   sign_out=sign_out, had_out=had_out)
    return x.new_empty((*x.shape[:-1], m))


def int_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int,
               sign_in: Tensor | None = None, had_in: Tensor | None = None, sign_out: Tensor | None = None,
               had_out: Tensor | None = None) -> Tensor:
    """``x W_hat^T`` with ``W_hat = (codes - z) * s`` read from the packed codes (never materialised); with
    ``sign_in`` the input is first ``hadamard_transform(x * sign_in, had_in)``, with ``sign_out`` the output
    then ``hadamard_transform(y, had_out) * sign_out`` (an RHT around the product, in x's compute precision)."""
    return torch.ops.yaqa.int_matmul.default(x, qweight, scales, zeros, bits, group_size, sign_in, had_in, sign_out,
                                             had_out)


@torch.library.register_fake("yaqa::int_matmul")
def _int_matmul_fake(x, qweight, scales, zeros, bits, group_size, sign_in=None, had_in=None, sign_out=None,
                     had_out=None) -> Tensor:
    _check_dtypes("int_matmul", _ACTIVATIONS, x=x)
    _check_dtypes("int_matmul", (torch.uint8,), qweight=qweight)
    _check_dtypes("int_matmul", (torch.float16, torch.float32), scales=scales, zeros=zeros)
    torch._check(x.dim() >= 1 and x.size(-1) > 0, lambda: "int_matmul: x must have a non-empty last dimension")
    n = x.size(-1)
    torch._check(1 <= bits <= 8, lambda: f"int_matmul: bits must be in 1..8, got {bits}")
    torch._check(group_size >= 1 and n % group_size == 0,
                 lambda: f"int_matmul: group_size = {group_size} must divide x's last dimension n = {n}")
    torch._check(qweight.dim() == 2 and qweight.size(0) > 0 and qweight.size(1) == (n + 7) // 8 * bits,
                 lambda: f"int_matmul: qweight must be (m, ceil(n / 8) * bits), got {tuple(qweight.shape)}")
    m = qweight.size(0)
    for name, t in (("scales", scales), ("zeros", zeros)):
        torch._check(t.dim() == 2 and t.size(0) in (1, m) and t.size(1) == n // group_size,
                     lambda: f"int_matmul: {name} must be (1 or m, n / group_size), got {tuple(t.shape)}")
    _check_rht_args("int_matmul", m, n, sign_in, had_in, sign_out, had_out)
    _check_devices("int_matmul", x=x, qweight=qweight, scales=scales, zeros=zeros, sign_in=sign_in, had_in=had_in,
                   sign_out=sign_out, had_out=had_out)
    return x.new_empty((*x.shape[:-1], m))
