"""yaqa::block_ldl and yaqa_ext.block_ldl against a Schur-complement reference and brute force."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import block_ldl_reference, first_failing_minor, spd_matrix

import yaqa_ext
from yaqa_ext import ops

# Relative backward error ||L D L^T - H||_F / ||H||_F of a Cholesky-based factorisation is a small
# multiple of n * eps (it does not grow with the condition number); these bounds leave ~10x room
# over what fp32 / fp64 give at n = 4096.
RECON_TOL = {torch.float32: 1e-5, torch.float64: 1e-13}


def blockdiag(D: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*D.double().cpu())


def relative_reconstruction_error(H: torch.Tensor, L: torch.Tensor, D: torch.Tensor, probes: int | None = None) -> float:
    """||L D L^T - H|| / ||H|| in fp64, exactly or (probes=k) on k random vectors (O(n^2) work)."""
    Hd, Ld = H.double().cpu(), L.double().cpu()
    b = D.size(-1)
    if probes is None:
        R = Ld @ blockdiag(D) @ Ld.T
        return float(torch.linalg.matrix_norm(R - Hd) / torch.linalg.matrix_norm(Hd))
    V = torch.randn(H.size(0), probes, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    W = Ld.T @ V
    W = torch.bmm(D.double().cpu(), W.view(-1, b, probes)).view(-1, probes)
    return float((Ld @ W - Hd @ V).norm() / (Hd @ V).norm())


def check_structure(L: torch.Tensor, D: torch.Tensor, b: int) -> None:
    """L is unit block-lower-triangular (exact I diagonal blocks, exact zeros above)."""
    n = L.size(0)
    nb = n // b
    blocks = L.view(nb, b, nb, b)
    eye = torch.eye(b, dtype=L.dtype, device=L.device)
    for i in range(nb):
        assert torch.equal(blocks[i, :, i, :], eye), f"diagonal block {i} of L is not exactly I"
    upper = torch.triu(torch.ones(nb, nb, dtype=torch.bool), 1)
    assert torch.count_nonzero(blocks.permute(0, 2, 1, 3)[upper.to(L.device)]) == 0, "L has nonzeros above its diagonal blocks"
    assert D.shape == (nb, b, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [16, 96])
@pytest.mark.parametrize("b", [1, 8, 16, 32])
def test_matches_schur_reference_small(device, dtype, n, b):
    if n % b:
        pytest.skip("block size does not divide n")
    H = spd_matrix(n, cond=1e3, seed=n + b, dtype=dtype).to(device)
    L, D, info = ops.block_ldl(H, b)
    assert info.item() == 0
    assert L.dtype == D.dtype == dtype and L.device == H.device and info.dtype == torch.int32
    check_structure(L, D, b)
    L_ref, D_ref = block_ldl_reference(H.cpu(), b)
    # L and D are unique; their forward error is bounded by cond(H) * eps = 1e3 * eps (x10 margin).
    tol = 1e3 * torch.finfo(dtype).eps * 10
    torch.testing.assert_close(L.double().cpu(), L_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(D.double().cpu(), D_ref, rtol=tol, atol=tol)
    assert relative_reconstruction_error(H, L, D) < RECON_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1024, 4096])
@pytest.mark.parametrize("b", [1, 8, 16, 32])
def test_reconstruction_large(device, dtype, n, b):
    H = spd_matrix(n, cond=1e4, seed=b, dtype=dtype).to(device) if n == 1024 else _large_spd(n, dtype, device)
    L, D, info = ops.block_ldl(H, b)
    assert info.item() == 0
    check_structure(L, D, b)
    assert relative_reconstruction_error(H, L, D, probes=8) < RECON_TOL[dtype]


def _large_spd(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """U U^T / 64 + diag(0.1..1) for Gaussian U (n x 64): SPD with cond ~ n, in O(64 n^2) work."""
    g = torch.Generator().manual_seed(n)
    U = torch.randn(n, 64, dtype=torch.float64, generator=g)
    diag = 0.1 + 0.9 * torch.rand(n, dtype=torch.float64, generator=g)
    return (U @ U.T / 64 + torch.diag(diag)).to(dtype).to(device)


def test_matches_reference_at_1024():
    H = spd_matrix(1024, cond=1e2, seed=3)
    L, D, _ = ops.block_ldl(H, 16)
    L_ref, D_ref = block_ldl_reference(H, 16)
    # fp64 with cond(H) = 100: forward errors ~ 100 * n * eps.
    torch.testing.assert_close(L, L_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(D, D_ref, rtol=1e-10, atol=1e-10)


def test_ill_conditioned_fp64(device):
    H = spd_matrix(256, cond=1e8, seed=7).to(device)
    L, D, info = ops.block_ldl(H, 16)
    assert info.item() == 0
    assert relative_reconstruction_error(H, L, D) < RECON_TOL[torch.float64]


def test_ill_conditioned_fp32_factors_after_damping(device):
    """cond 1e8 is beyond fp32 (eps 6e-8): the damped retry must produce a valid factorisation."""
    H = spd_matrix(512, cond=1e8, seed=11, dtype=torch.float32).to(device)
    res = yaqa_ext.block_ldl(H, block_size=16, damp=0.0, damp_step=1e-4, max_damp_tries=20)
    Hd = H.double() + res.damp * H.double().diagonal().mean() * torch.eye(512, dtype=torch.float64, device=device)
    assert relative_reconstruction_error(Hd, res.L, res.D) < RECON_TOL[torch.float32]
    # fp64 brute force: the returned damping is the first on the damping schedule that is PD in fp32.
    first_ok = next(
        k for k in range(21) if ops.block_ldl(H + k * 1e-4 * H.diagonal().mean() * torch.eye(512, device=device), 16)[2].item() == 0
    )
    assert res.damp == pytest.approx(first_ok * 1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_info_names_first_failing_minor(device, seed):
    g = torch.Generator().manual_seed(seed)
    n = 48
    A = torch.randn(n, n, dtype=torch.float64, generator=g)
    H = A @ A.T / n + 0.05 * torch.eye(n, dtype=torch.float64)
    bad = int(torch.randint(0, n, (1,), generator=g))
    H[bad, bad] -= H[bad, bad] + 1.0  # a negative diagonal entry: minor bad+1 (or earlier) fails
    expected = first_failing_minor(H)
    assert expected > 0
    _, _, info = ops.block_ldl(H.to(device), 8)
    assert info.item() == expected


def test_non_finite_reported(device):
    for value in (float("nan"), float("inf"), float("-inf")):
        H = torch.eye(32, device=device)
        H[5, 3] = value
        assert ops.block_ldl(H, 8)[2].item() == -1
        with pytest.raises(ValueError, match="NaN or infinite"):
            yaqa_ext.block_ldl(H, 8)
    H = torch.eye(32, device=device)
    H[7, 7] = float("inf")  # LAPACK factors this one (info 0, infinite D): it used to pass as a success on the CPU
    assert ops.block_ldl(H, 8)[2].item() == -1


def test_damping_chooses_first_positive_definite_step(device):
    """Indefinite by a small negative eigenvalue: brute-force fp64 eigenvalues give the damping needed."""
    n = 64
    H = spd_matrix(n, cond=10.0, seed=5)
    evals, evecs = torch.linalg.eigh(H)
    evals[0] = -0.03 * H.diagonal().mean()
    H = (evecs * evals) @ evecs.T
    scale = H.diagonal().mean()
    expected = next(k * 1e-2 for k in range(10) if torch.linalg.eigvalsh(H + k * 1e-2 * scale * torch.eye(n, dtype=torch.float64)).min() > 0)
    res = yaqa_ext.block_ldl(H.to(device), block_size=16, damp=0.0, damp_step=1e-2)
    assert res.damp == pytest.approx(expected)
    assert expected > 0


def test_damping_exhausted_raises(device):
    H = torch.diag(torch.tensor([10.0] * 31 + [-5.0], dtype=torch.float64, device=device))  # mean diagonal 9.53
    with pytest.raises(torch.linalg.LinAlgError, match=r"32 x 32 matrix is not positive definite.*0, 0\.01, 0\.02"):
        yaqa_ext.block_ldl(H, 16, damp=0.0, damp_step=0.01, max_damp_tries=2)


@pytest.mark.parametrize("diagonal", [0.0, -1.0])
def test_damping_stops_at_once_without_a_positive_mean_diagonal(device, diagonal):
    """A zero H (a dead layer) used to retry max_damp_tries times adding 0 * I each time."""
    H = diagonal * torch.eye(32, dtype=torch.float64, device=device)
    with pytest.raises(torch.linalg.LinAlgError, match="mean diagonal is .*relative damping cannot"):
        yaqa_ext.block_ldl(H, 16, damp=0.0, damp_step=0.01, max_damp_tries=10**9)


def test_initial_damping_applied(device):
    H = spd_matrix(32, cond=10.0, seed=2).to(device)
    res = yaqa_ext.block_ldl(H, 8, damp=0.5)
    assert res.damp == 0.5
    Hd = H + 0.5 * H.diagonal().mean() * torch.eye(32, dtype=H.dtype, device=device)
    assert relative_reconstruction_error(Hd, res.L, res.D) < RECON_TOL[torch.float64]


@pytest.mark.parametrize("garbage", [7.0, float("nan")])
def test_input_not_modified_and_lower_triangle_only(device, garbage):
    H = spd_matrix(64, cond=10.0, seed=9).to(device)
    upper_garbage = torch.tril(H) + torch.triu(torch.full_like(H, garbage), 1)
    before = upper_garbage.clone()
    L1, D1, _ = ops.block_ldl(H, 16)
    L2, D2, info = ops.block_ldl(upper_garbage, 16)
    assert info.item() == 0
    assert torch.equal(upper_garbage.nan_to_num(), before.nan_to_num())
    torch.testing.assert_close(L1, L2, rtol=0, atol=0)  # same lower triangle -> bitwise the same factors
    torch.testing.assert_close(D1, D2, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda d: torch.eye(4, 8, device=d), ValueError, r"square 2-D matrix, got shape \[4, 8\]"),
        (lambda d: torch.ones(16, device=d), ValueError, "square 2-D matrix"),
        (lambda d: torch.eye(24, device=d), ValueError, "n = 24 is not divisible by block_size = 16"),
        (lambda d: torch.eye(16, dtype=torch.int32, device=d), TypeError, "float32 or float64, got Int"),
        (lambda d: torch.eye(16, dtype=torch.float16, device=d), TypeError, r"float32 or float64.*\.float\(\)"),
        (lambda d: torch.zeros(0, 0, device=d), ValueError, "empty"),
    ],
)
def test_bad_inputs(device, make, exc, match):
    H = make(device)
    with pytest.raises(exc, match=match):
        ops.block_ldl(H, 16)
    with pytest.raises(exc, match=match):
        yaqa_ext.block_ldl(H, 16)


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        ops.block_ldl(torch.eye(16), 0)
    with pytest.raises(ValueError, match="must be >= 0"):
        yaqa_ext.block_ldl(torch.eye(16), 16, damp=-1.0)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        yaqa_ext.block_ldl([[1.0]], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype):
    H = spd_matrix(64, cond=10.0, seed=1, dtype=dtype).to(device)
    torch.library.opcheck(torch.ops.yaqa.block_ldl.default, (H, 16))
    torch.library.opcheck(torch.ops.yaqa.block_ldl.default, (H, 1))


@pytest.mark.skipif(not (torch.cuda.is_available() and yaqa_ext.WITH_CUDA), reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    H = _large_spd(1024, dtype, "cpu")
    Lc, Dc, _ = ops.block_ldl(H, 16)
    Lg, Dg, info = ops.block_ldl(H.cuda(), 16)
    assert info.item() == 0
    # Different Cholesky implementations (LAPACK vs cuSOLVER) agree to the forward error: cond ~ 10.
    tol = 100 * torch.finfo(dtype).eps * 1024
    torch.testing.assert_close(Lg.cpu(), Lc, rtol=tol, atol=tol)
    torch.testing.assert_close(Dg.cpu(), Dc, rtol=tol, atol=tol)


@settings(max_examples=25, deadline=None)
@given(nb=st.integers(1, 12), b=st.sampled_from([1, 2, 3, 4, 8, 16]), seed=st.integers(0, 2**16))
def test_property_random_spd(nb, b, seed):
    n = nb * b
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, 2 * n, dtype=torch.float64, generator=g)
    H = A @ A.T / (2 * n) + 1e-3 * torch.eye(n, dtype=torch.float64)
    L, D, info = ops.block_ldl(H, b)
    assert info.item() == 0
    check_structure(L, D, b)
    assert relative_reconstruction_error(H, L, D) < RECON_TOL[torch.float64]
    L_ref, D_ref = block_ldl_reference(H, b)
    torch.testing.assert_close(D, D_ref, rtol=1e-8, atol=1e-8)  # cond(H) <= ~1e4 here
