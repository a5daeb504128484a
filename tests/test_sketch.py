"""Kronecker-factor accumulation ops against brute force (explicit per-sequence gradients, per-token
outer products, fp64 loops)."""

from __future__ import annotations

import pytest
import torch

import yaqa_ext
from yaqa_ext import ops


def rand_sym(n: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    S = A @ A.T / n
    return ((S + S.T) / 2).to(dtype).to(device)  # exactly symmetric


def sketch_b_reference(X, G, P_in=None, P_out=None):
    """sum_b Gw_b^T P_out Gw_b and sum_b Gw_b P_in Gw_b^T with Gw_b = G_b^T X_b, one sequence at a time."""
    X, G = X.double().cpu(), G.double().cpu()
    n, m = X.shape[-1], G.shape[-1]
    P_in = torch.eye(n, dtype=torch.float64) if P_in is None else P_in.double().cpu()
    P_out = torch.eye(m, dtype=torch.float64) if P_out is None else P_out.double().cpu()
    H_in, H_out = torch.zeros(n, n, dtype=torch.float64), torch.zeros(m, m, dtype=torch.float64)
    for b in range(X.shape[0]):
        Gw = G[b].T @ X[b]
        H_in += Gw.T @ P_out @ Gw
        H_out += Gw @ P_in @ Gw.T
    return H_in, H_out


def sketch_a_reference(X, G, P_in=None, P_out=None):
    """Token by token: sum_t (g_t P_out g_t^T) x_t^T x_t and sum_t (x_t P_in x_t^T) g_t^T g_t."""
    x = X.double().cpu().reshape(-1, X.shape[-1])
    g = G.double().cpu().reshape(-1, G.shape[-1])
    n, m = x.shape[1], g.shape[1]
    P_in = torch.eye(n, dtype=torch.float64) if P_in is None else P_in.double().cpu()
    P_out = torch.eye(m, dtype=torch.float64) if P_out is None else P_out.double().cpu()
    H_in, H_out = torch.zeros(n, n, dtype=torch.float64), torch.zeros(m, m, dtype=torch.float64)
    for t in range(x.shape[0]):
        H_in += (g[t] @ P_out @ g[t]) * torch.outer(x[t], x[t])
        H_out += (x[t] @ P_in @ x[t]) * torch.outer(g[t], g[t])
    return H_in, H_out


def assert_factor_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Products are fp32 (eps 6e-8) with inner dimensions <= a few hundred: relative errors ~1e-6;
    # 1e-4 of the largest entry leaves room and still catches any missing or wrong term.
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=1e-4, atol=1e-4 * scale)


SHAPES = [(3, 5, 8, 12), (1, 7, 16, 16), (4, 1, 12, 4), (1, 1, 5, 3), (2, 33, 24, 40)]


@pytest.mark.parametrize(("B", "T", "n", "m"), SHAPES)
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("contraction", ["auto", "gradient", "gram"])
def test_sketch_b_matches_brute_force(device, B, T, n, m, acc_dtype, weighted, contraction):
    g = torch.Generator().manual_seed(B * 100 + T)
    X = torch.randn(B, T, n, generator=g).to(device)
    G = torch.randn(B, T, m, generator=g).to(device)
    P_in = rand_sym(n, torch.float32, device, 1) if weighted else None
    P_out = rand_sym(m, torch.float64, device, 2) if weighted else None
    H_in0, H_out0 = rand_sym(n, acc_dtype, device, 3), rand_sym(m, acc_dtype, device, 4)
    H_in, H_out = H_in0.clone(), H_out0.clone()
    yaqa_ext.sketch_b_update(X, G, H_in, H_out, P_in=P_in, P_out=P_out, contraction=contraction)
    ref_in, ref_out = sketch_b_reference(X, G, P_in, P_out)
    assert H_in.dtype == acc_dtype and H_out.dtype == acc_dtype
    assert_factor_close(H_in - H_in0, ref_in)
    assert_factor_close(H_out - H_out0, ref_out)
    # every update is symmetric (SYRK / SYRKX of the upper triangle, mirrored): the factors stay exactly so
    assert torch.equal(H_in, H_in.T) and torch.equal(H_out, H_out.T)


@pytest.mark.parametrize("contraction", ["gradient", "gram"])
@pytest.mark.parametrize("weighted", [False, True])
def test_fp64_activations_are_multiplied_in_fp64(device, contraction, weighted):
    """fp64 in means fp64 maths: the relative error against the fp64 loop is ~1e-15, where fp32
    products give ~1e-7 (so the bound 1e-12 fails if any product is done in fp32)."""
    g = torch.Generator().manual_seed(11)
    X = torch.randn(3, 40, 24, generator=g, dtype=torch.float64).to(device)
    G = torch.randn(3, 40, 36, generator=g, dtype=torch.float64).to(device)
    P_in = rand_sym(24, torch.float64, device, 1) if weighted else None
    P_out = rand_sym(36, torch.float64, device, 2) if weighted else None
    H_in = torch.zeros(24, 24, dtype=torch.float64, device=device)
    H_out = torch.zeros(36, 36, dtype=torch.float64, device=device)
    ops.sketch_b_update(X, G, H_in, H_out, P_in, P_out, contraction=contraction)
    ref_in, ref_out = sketch_b_reference(X, G, P_in, P_out)
    for H, ref in ((H_in, ref_in), (H_out, ref_out)):
        assert float((H.cpu() - ref).norm() / ref.norm()) < 1e-12
    Ha_in, Ha_out = torch.zeros_like(H_in), torch.zeros_like(H_out)
    ops.sketch_a_update(X, G, Ha_in, Ha_out, P_in, P_out)
    for H, ref in zip((Ha_in, Ha_out), sketch_a_reference(X, G, P_in, P_out)):
        assert float((H.cpu() - ref).norm() / ref.norm()) < 1e-12
    M = torch.zeros_like(H_in)
    ops.input_moment_update(X, M)
    x = X.cpu().reshape(-1, 24)
    assert float((M.cpu() - x.T @ x).norm() / (x.T @ x).norm()) < 1e-12


@pytest.mark.parametrize(("T", "n", "m"), [(256, 1024, 1024), (512, 576, 576), (16, 96, 64), (200, 48, 160)])
def test_contractions_agree_on_wide_layers(device, T, n, m):
    """Gram-first and gradient-first orders give the same factors (each against the fp64 loop) on shapes
    where either one has fewer flops."""
    g = torch.Generator().manual_seed(T + n)
    X = torch.randn(2, T, n, generator=g).to(device)
    G = torch.randn(2, T, m, generator=g).to(device) / T
    ref_in, ref_out = sketch_b_reference(X, G)
    for contraction in ("gradient", "gram", "auto"):
        H_in, H_out = torch.zeros(n, n, device=device), torch.zeros(m, m, device=device)
        ops.sketch_b_update(X, G, H_in, H_out, contraction=contraction)
        assert_factor_close(H_in, ref_in)
        assert_factor_close(H_out, ref_out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_sketch_b_activation_dtypes_and_non_contiguous(device, dtype):
    g = torch.Generator().manual_seed(7)
    X = torch.randn(6, 3, 10, generator=g).to(dtype).to(device).transpose(0, 1)  # (3, 6, 10), non-contiguous
    G = torch.randn(3, 14, 6, generator=g).to(dtype).to(device).permute(0, 2, 1)  # (3, 6, 14)
    assert not X.is_contiguous() and not G.is_contiguous()
    H_in = torch.zeros(10, 10, device=device)
    H_out = torch.zeros(14, 14, dtype=torch.float64, device=device)
    ops.sketch_b_update(X, G, H_in, H_out)
    ref_in, ref_out = sketch_b_reference(X, G)  # the same (rounded) activations, upcast exactly
    assert_factor_close(H_in, ref_in)
    assert_factor_close(H_out, ref_out)


@pytest.mark.parametrize("shape", [(4, 9), (2, 3, 9), (1, 1, 9)])
@pytest.mark.parametrize("weighted", [False, True])
def test_sketch_a_matches_brute_force(device, shape, weighted):
    g = torch.Generator().manual_seed(len(shape))
    X = torch.randn(*shape, generator=g).to(device)
    G = torch.randn(*shape[:-1], 5, generator=g).to(device)
    P_in = rand_sym(9, torch.float32, device, 5) if weighted else None
    P_out = rand_sym(5, torch.float32, device, 6) if weighted else None
    H_in = torch.zeros(9, 9, dtype=torch.float64, device=device)
    H_out = torch.zeros(5, 5, device=device)
    yaqa_ext.sketch_a_update(X, G, H_in, H_out, P_in=P_in, P_out=P_out)
    ref_in, ref_out = sketch_a_reference(X, G, P_in, P_out)
    assert_factor_close(H_in, ref_in)
    assert_factor_close(H_out, ref_out)


def test_sketch_a_one_factor_only(device):
    X, G = torch.randn(2, 4, 6, device=device), torch.randn(2, 4, 3, device=device)
    H_out = torch.zeros(3, 3, device=device)
    ops.sketch_a_update(X, G, None, H_out)
    assert_factor_close(H_out, sketch_a_reference(X, G)[1])
    with pytest.raises(ValueError, match="give H_in, H_out or both"):
        ops.sketch_a_update(X, G, None, None)


@pytest.mark.parametrize("shape", [(50, 12), (3, 7, 12), (1, 12)])
def test_input_moment_matches_brute_force(device, shape):
    X = torch.randn(*shape, device=device)
    H = rand_sym(12, torch.float32, device, 9)
    H0 = H.clone()
    yaqa_ext.input_moment_update(X, H)
    x = X.double().cpu().reshape(-1, 12)
    ref = sum(torch.outer(x[t], x[t]) for t in range(x.shape[0]))
    assert_factor_close(H - H0, ref)
    assert torch.equal(H, H.T)


def test_accumulates_across_calls(device):
    """Two updates of half the sequences each equal one update of all of them."""
    X, G = torch.randn(4, 6, 8, device=device), torch.randn(4, 6, 5, device=device)
    Ha_in, Ha_out = torch.zeros(8, 8, device=device), torch.zeros(5, 5, device=device)
    ops.sketch_b_update(X[:2], G[:2], Ha_in, Ha_out)
    ops.sketch_b_update(X[2:], G[2:], Ha_in, Ha_out)
    Hb_in, Hb_out = torch.zeros(8, 8, device=device), torch.zeros(5, 5, device=device)
    ops.sketch_b_update(X, G, Hb_in, Hb_out)
    torch.testing.assert_close(Ha_in, Hb_in, rtol=1e-5, atol=1e-4)  # same sums, another fp32 order
    torch.testing.assert_close(Ha_out, Hb_out, rtol=1e-5, atol=1e-4)


def test_symmetric_updates_mirror_the_upper_triangle(device):
    """SYRK-based updates define the result by the upper triangle of H + update, mirrored (both backends)."""
    X = torch.randn(30, 6, device=device)
    H = torch.randn(6, 6, dtype=torch.float64, device=device)  # deliberately not symmetric
    expected = H.double().cpu() + X.double().cpu().T @ X.double().cpu()
    expected = expected.triu() + expected.triu(1).T
    ops.input_moment_update(X, H)
    assert_factor_close(H, expected)
    assert torch.equal(H, H.T)


def test_degenerate_shapes(device):
    # a size-1 last dimension whose stride is not 1 (a view that still counts as contiguous)
    X = torch.randn(2, 1, 3, device=device).transpose(1, 2)
    G = torch.randn(2, 3, 2, device=device)
    H_in, H_out = torch.zeros(1, 1, device=device), torch.zeros(2, 2, device=device)
    ops.sketch_b_update(X, G, H_in, H_out)
    ref_in, ref_out = sketch_b_reference(X, G)
    assert_factor_close(H_in, ref_in)
    assert_factor_close(H_out, ref_out)
    # zero features: nothing to do, no error
    ops.sketch_b_update(torch.randn(2, 3, 0, device=device), G, torch.zeros(0, 0, device=device), H_out)


def test_bad_inputs(device):
    X, G = torch.randn(2, 3, 4, device=device), torch.randn(2, 3, 5, device=device)
    H_in, H_out = torch.zeros(4, 4, device=device), torch.zeros(5, 5, device=device)
    cases = [
        ((X.long(), G, H_in, H_out), TypeError, "X must be a floating-point tensor"),
        ((X, G[:1], H_in, H_out), ValueError, r"X must be \(B, T, n\) and G \(B, T, m\) with the same B and T"),
        ((X[0], G, H_in, H_out), ValueError, r"X must be \(B, T, n\)"),
        ((X, G, torch.zeros(5, 5, device=device), H_out), ValueError, "H_in must be 4 x 4, got shape"),
        ((X, G, H_in, torch.zeros(5, 5, dtype=torch.int32, device=device)), TypeError, "H_out must be a float32 or float64"),
        ((X, G, torch.zeros(4, 8, device=device)[:, :4], H_out), ValueError, "H_in must be contiguous"),
        ((X, G, H_in, H_out, torch.eye(5, device=device)), ValueError, "P_in must be 4 x 4"),
        ((X, G, H_in, H_out, None, None, False, "fast"), ValueError,
         "contraction must be 'auto', 'gradient' or 'gram', got 'fast'"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            ops.sketch_b_update(*args)
    with pytest.raises(ValueError, match="same leading shape"):
        ops.sketch_a_update(X, G[:, :2], H_in, H_out)
    with pytest.raises(ValueError, match="H must be 4 x 4"):
        ops.input_moment_update(X, H_out)


def test_device_mismatch_is_an_error():
    if not (torch.cuda.is_available() and yaqa_ext.WITH_CUDA):
        pytest.skip("needs a CUDA GPU")
    X, G = torch.randn(2, 3, 4, device="cuda"), torch.randn(2, 3, 5, device="cuda")
    with pytest.raises(ValueError, match="X is on cuda:0 but H_in is on cpu"):
        ops.sketch_b_update(X, G, torch.zeros(4, 4), torch.zeros(5, 5, device="cuda"))


def test_opcheck(device):
    X, G = torch.randn(2, 3, 4, device=device), torch.randn(2, 3, 5, device=device)
    P_in, P_out = rand_sym(4, torch.float32, device, 1), rand_sym(5, torch.float32, device, 2)
    torch.library.opcheck(
        torch.ops.yaqa.sketch_b_update.default, (X, G, torch.zeros(4, 4, device=device), torch.zeros(5, 5, device=device))
    )
    for contraction in ("gradient", "gram"):
        torch.library.opcheck(
            torch.ops.yaqa.sketch_b_update.default,
            (X, G, torch.zeros(4, 4, device=device), torch.zeros(5, 5, device=device), P_in, P_out, False, contraction),
        )
    torch.library.opcheck(
        torch.ops.yaqa.sketch_a_update.default, (X, G, torch.zeros(4, 4, device=device), None, None, P_out)
    )
    torch.library.opcheck(torch.ops.yaqa.input_moment_update.default, (X, torch.zeros(4, 4, device=device)))


@pytest.mark.skipif(not (torch.cuda.is_available() and yaqa_ext.WITH_CUDA), reason="needs a CUDA GPU and a CUDA build")
def test_cuda_tf32_only_when_asked():
    """TF32 (10-bit mantissa) products differ from fp32 ones by ~1e-3 relative; strict mode must not."""
    g = torch.Generator().manual_seed(0)
    X, G = torch.randn(4, 256, 512, generator=g), torch.randn(4, 256, 384, generator=g)
    ref_in, ref_out = sketch_b_reference(X, G)
    for tf32, bound in ((False, 1e-5), (True, 2e-2)):
        H_in, H_out = torch.zeros(512, 512, device="cuda"), torch.zeros(384, 384, device="cuda")
        ops.sketch_b_update(X.cuda(), G.cuda(), H_in, H_out, allow_tf32=tf32)
        err = float((H_in.double().cpu() - ref_in).norm() / ref_in.norm())
        assert err < bound, f"allow_tf32={tf32}: relative error {err}"
