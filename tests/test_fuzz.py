"""Bounded fuzzing of every op (hypothesis): shapes, dtypes, devices (meta included), layouts and values, each
call ending in a result that matches the plain-PyTorch reference or in a Python exception; never a crash, a
hang or a silently wrong result. The default run takes well under two minutes; ``-m slow`` runs 10x the
examples (the profile is chosen in conftest.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import block_ldl_reference, ldlq_reference
from test_sketch import sketch_a_reference, sketch_b_reference

from yaqa_ext import ops
from yaqa_ext.hadamard import small_hadamard

pytestmark = pytest.mark.slow

ERRORS = (ValueError, TypeError, RuntimeError, IndexError, NotImplementedError)
"""What a refused call may raise (torch's TORCH_CHECK_VALUE / _TYPE / TORCH_CHECK, and index errors)."""
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPES = st.sampled_from(FLOATS + [torch.int64])
DEVICES = st.sampled_from(["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else []))
LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced", "expanded"])
VALUES = st.sampled_from(["normal", "large", "tiny", "nan", "inf"])
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def make(shape: tuple[int, ...], dtype: torch.dtype, layout: str, values: str, seed: int) -> torch.Tensor:
    """A CPU tensor of ``shape`` with the given kind of values (one NaN or infinity planted), in ``layout``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    t = {"normal": t, "large": t * 1e4, "tiny": t * 1e-30}.get(values, t)
    if values in ("nan", "inf") and t.numel():
        t.view(-1)[int(torch.randint(t.numel(), (1,), generator=g))] = float(values)
    return relayout(t.to(dtype) if dtype.is_floating_point else (t * 3).round().to(dtype), layout)


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` stored otherwise: column-major, every other element of a wider buffer, or (expanded) its first row
    broadcast over the others, which changes the values: the reference always reads the returned tensor."""
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced" and t.dim() >= 1:
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "expanded" and t.dim() >= 1 and t.shape[0] > 1:
        return t[:1].expand(t.shape)
    return t


def place(t: torch.Tensor | None, device: str) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def finite(*ts: torch.Tensor | None) -> bool:
    return all(t is None or bool(torch.isfinite(t.double()).all()) for t in ts)


def hadamard_reference(x: torch.Tensor, had: torch.Tensor | None) -> torch.Tensor:
    """x (kron(Sylvester_p, had))^T / sqrt(n) in fp64, with the dense matrix built by Kronecker products."""
    n = x.size(-1)
    c = 1 if had is None else had.size(0)
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.size(0) < n // c:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    dense = torch.kron(H, torch.ones(1, 1, dtype=torch.float64) if had is None else had.double())
    return x.double() @ dense.T / math.sqrt(n)


@FUZZ
@given(batch=st.lists(st.integers(0, 3), max_size=2), n=st.integers(0, 80), c=st.sampled_from([None, 0, 2, 12, 20]),
       dtype=DTYPES, device=DEVICES, layout=LAYOUTS, values=VALUES, seed=st.integers(0, 2**16))
def test_hadamard_transform(batch, n, c, dtype, device, layout, values, seed):
    x = make((*batch, n), dtype, layout, values, seed)
    had = None if c is None else (small_hadamard(c).float() if c >= 12 else torch.ones(c, c))
    try:
        y = ops.hadamard_transform(place(x, device), place(had, device))
    except ERRORS:
        return
    assert y.shape == x.shape and y.dtype == x.dtype and y.device.type == device
    if device == "meta" or not finite(x):
        return
    ref = hadamard_reference(x, had)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(y.double().cpu(), ref, rtol=tol, atol=tol * scale)  # one output rounding


@FUZZ
@given(n=st.integers(0, 24), square=st.booleans(), b=st.integers(-1, 9), dtype=DTYPES, device=DEVICES,
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       kind=st.sampled_from(["spd", "indefinite", "nan", "inf", "zero"]), seed=st.integers(0, 2**16))
def test_block_ldl(n, square, b, dtype, device, layout, kind, seed):
    A = make((n, n), torch.float64, "contiguous", "normal", seed)
    H = {"spd": A @ A.T + n * torch.eye(n, dtype=torch.float64), "zero": torch.zeros(n, n, dtype=torch.float64)}.get(
        kind, A + A.T)
    if kind in ("nan", "inf") and n:
        H[n - 1, 0] = H[0, n - 1] = float(kind)
    if not square:
        H = torch.cat([H, torch.ones(n, 1, dtype=torch.float64)], 1)
    H = relayout(H.to(dtype) if dtype.is_floating_point else H.round().to(dtype), layout)
    try:
        L, D, info = ops.block_ldl(place(H, device), b)
    except ERRORS:
        return
    assert square and n > 0 and b >= 1 and n % b == 0 and dtype in (torch.float32, torch.float64)
    assert L.shape == (n, n) and D.shape == (n // b, b, b) and L.dtype == D.dtype == dtype
    if device == "meta":
        return
    status = int(info)
    if kind == "spd":
        assert status == 0
        L_ref, D_ref = block_ldl_reference(H.double(), b)
        tol = 1e-9 if dtype == torch.float64 else 1e-3
        torch.testing.assert_close(L.double().cpu(), L_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(D.double().cpu(), D_ref, rtol=tol, atol=tol * float(D_ref.abs().max()))
    elif kind in ("nan", "inf"):
        assert status == -1  # a non-finite H is reported, never factored into finite garbage
    else:  # not positive definite: reported with the failing minor, or (if it factors) finite factors
        assert status != 0 or finite(L, D)


@FUZZ
@given(mt=st.integers(0, 3), nt=st.integers(0, 3), td_x=st.integers(1, 3), td_y=st.integers(1, 3),
       bits=st.integers(0, 9), groups=st.sampled_from([1, 2, 3]), sides=st.sampled_from(["both", "in", "out", "none"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), device=DEVICES, layout=LAYOUTS,
       values=VALUES, bad=st.sampled_from([None, "scales", "zeros", "L_in"]), seed=st.integers(0, 2**16))
def test_ldlq_round(mt, nt, td_x, td_y, bits, groups, sides, dtype, device, layout, values, bad, seed):
    m, n = mt * td_x, nt * td_y
    W = make((m, n), dtype, layout, values, seed)
    g = torch.Generator().manual_seed(seed + 1)
    L_in = torch.tril(torch.randn(n, n, generator=g), -1) * 0.3 + torch.eye(n) if sides in ("both", "in") else None
    L_out = torch.tril(torch.randn(m, m, generator=g), -1) * 0.3 + torch.eye(m) if sides in ("both", "out") else None
    gs = n // groups if n and n % groups == 0 else n  # 0 (refused) for an empty W
    ng = n // gs if gs else 1
    scales = torch.rand(m, ng, generator=g) * 0.5 + 0.1
    zeros = torch.full((m, ng), 2.0 ** max(bits - 1, 0) - 0.5)
    if bad == "scales" and scales.numel():
        scales[0, 0] = -1.0
    if bad == "zeros" and zeros.numel():
        zeros[0, 0] = float("nan")
    if bad == "L_in" and L_in is not None and n > 1:
        L_in[1, 0] = float("inf")
    args = [place(t, device) for t in (W, L_in, L_out, scales, zeros)]
    try:
        W_hat, codes = ops.ldlq_round(*args, bits, gs, td_x, td_y)
    except ERRORS:
        return
    assert dtype == torch.float32 and m * n > 0 and 1 <= bits <= 8
    assert device == "meta" or (finite(W, L_in, L_out, zeros) and bad != "scales")  # values: real kernels only
    assert W_hat.shape == codes.shape == (m, n) and codes.dtype == torch.uint8
    if device == "meta":
        return
    ref_hat, ref_codes = ldlq_reference(W, L_in, L_out, scales, zeros, bits, gs, td_x, td_y)
    assert int(codes.max()) <= 2**bits - 1
    # The op accumulates feedback in fp32 in another order than the fp64 reference: a code may flip only where
    # the pre-rounding value sits within fp32 noise of a rounding boundary, which random data makes rare.
    assert (codes.cpu() != ref_codes).float().mean() <= 0.05
    flipped = codes.cpu() != ref_codes
    torch.testing.assert_close(W_hat.cpu()[~flipped], ref_hat[~flipped], rtol=1e-5, atol=1e-6)


SKETCH_OPS = st.sampled_from(["B", "A", "input"])


@FUZZ
@given(op=SKETCH_OPS, B=st.integers(0, 3), T=st.integers(0, 6), n=st.integers(0, 10), m=st.integers(0, 10),
       x_dtype=DTYPES, acc=st.sampled_from([torch.float32, torch.float64, torch.float16]), weighted=st.booleans(),
       device=DEVICES, layout=LAYOUTS, values=VALUES, wrong=st.sampled_from([None, "H_in", "G"]),
       seed=st.integers(0, 2**16))
def test_sketch_updates(op, B, T, n, m, x_dtype, acc, weighted, device, layout, values, wrong, seed):
    lead = (B * T,) if op == "A" else (B, T)  # Sketch A takes token rows, Sketch B sequences, the moment either
    X = make((*lead, n), x_dtype, layout, values, seed)
    g_lead = (B * (T + (wrong == "G")),) if op == "A" else (B, T + (wrong == "G"))
    G = make((*g_lead, m), x_dtype if x_dtype.is_floating_point else torch.float32, layout, "normal", seed + 1)
    grow = int(wrong == "H_in")
    H_in, H_out = torch.zeros(n + grow, n + grow, dtype=acc), torch.zeros(m, m, dtype=acc)
    P_in, P_out = [make((k, k), torch.float32, "contiguous", "normal", seed + 2 + k) if weighted else None for k in (n, m)]
    # Power-iteration weights are symmetric factors; an fp32 P @ P.T is symmetric only up to rounding (its (i, j)
    # and (j, i) sums run in different orders), and the kernels may read either triangle: symmetrise exactly.
    P_in, P_out = [None if P is None else (P @ P.T + (P @ P.T).T) / 2 for P in (P_in, P_out)]
    dev = [place(t, device) for t in (X, G, H_in, H_out, P_in, P_out)]
    try:
        if op == "B":
            ops.sketch_b_update(*dev)
        elif op == "A":
            ops.sketch_a_update(*dev)
        else:
            ops.input_moment_update(dev[0], dev[2])
    except ERRORS:
        return
    assert acc != torch.float16 and wrong != "H_in" and x_dtype.is_floating_point
    assert op == "input" or X.shape[:-1] == G.shape[:-1]
    if device == "meta" or not finite(X):
        return
    if op == "input":
        x = X.double().reshape(-1, n)
        ref_in, ref_out = x.T @ x, None
    else:
        ref_in, ref_out = (sketch_b_reference if op == "B" else sketch_a_reference)(X, G, P_in, P_out)
    # Products in fp32 (fp64 for fp64 activations) of exactly converted inputs: relative to the largest entry.
    # fp64 maths only with fp64 activations and an fp64 accumulator; fp32 products of tiny values underflow
    # (below ~1e-38), which the fp64 reference does not: an absolute floor.
    tol = 1e-10 if x_dtype == acc == torch.float64 else 1e-4
    floor = 0.0 if x_dtype == acc == torch.float64 else 1e-37
    for H, ref in ((dev[2], ref_in), (dev[3], ref_out)):
        if ref is not None and ref.numel():
            scale = float(ref.abs().max()) or 1.0
            torch.testing.assert_close(H.double().cpu(), ref, rtol=0, atol=tol * scale + floor)
