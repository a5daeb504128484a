"""Hadamard transforms and the RHT against dense/Kronecker references built independently here."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import yaqa_ext
from yaqa_ext import ops
from yaqa_ext.hadamard import RHT, SUPPORTED_C, hadamard_factor, hadamard_matrix, hadamard_transform, small_hadamard


@functools.cache
def sylvester(p: int) -> torch.Tensor:
    """Independent Sylvester construction: H[i, j] = (-1)^popcount(i & j)."""
    i = torch.arange(p)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits >>= 1
    return (1 - 2 * parity).double()


def kron_reference(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """(Sylvester_p ⊗ H_c) x / sqrt(n) along the last axis, applying each Kronecker factor to its own
    axis of x viewed as (..., p1, p2, c) with p = p1 * p2 (no n x n matrix is formed)."""
    p1 = 1 << ((p.bit_length() - 1) // 2)
    p2 = p // p1
    hc = small_hadamard(c) if c > 1 else torch.ones(1, 1, dtype=torch.float64)
    X = x.double().reshape(*x.shape[:-1], p1, p2, c)
    Y = torch.einsum("ai,bj,ck,...ijk->...abc", sylvester(p1), sylvester(p2), hc, X)
    return Y.reshape(x.shape) / math.sqrt(p * c)


def supported_sizes(limit: int) -> list[int]:
    sizes = {1 << k for k in range(15) if 1 << k <= limit}
    sizes |= {(1 << k) * c for c in SUPPORTED_C for k in range(15) if (1 << k) * c <= limit}
    return sorted(sizes)


@pytest.mark.parametrize("c", SUPPORTED_C)
def test_small_hadamard_is_hadamard(c):
    H = small_hadamard(c)
    assert H.shape == (c, c)
    assert torch.all(H.abs() == 1)
    assert torch.equal(H @ H.T, c * torch.eye(c, dtype=torch.float64))


def test_every_supported_size_up_to_16384_matches_kronecker_reference(device):
    g = torch.Generator().manual_seed(0)
    for n in supported_sizes(16384):
        p, c = hadamard_factor(n)
        x = torch.randn(3, n, generator=g)
        y = hadamard_transform(x.to(device))
        # fp32 butterflies/sums of n terms: errors ~ log2(n) * eps * |x| (plus c * eps for the dense factor).
        torch.testing.assert_close(y.double().cpu(), kron_reference(x, p, c), rtol=0, atol=2e-5, msg=f"n = {n}")


@pytest.mark.parametrize("n", [1, 2, 12, 40, 64, 172, 344, 1024, 11008 // 16])
def test_matches_dense_matrix(device, n):
    p, c = hadamard_factor(n)
    dense = torch.kron(sylvester(p), small_hadamard(c) if c > 1 else torch.ones(1, 1, dtype=torch.float64)) / math.sqrt(n)
    assert torch.allclose(dense @ dense.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    torch.testing.assert_close(hadamard_matrix(n, torch.float64), dense, rtol=0, atol=0)
    x = torch.randn(5, 2, n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x.to(device)).cpu(), x @ dense.T, rtol=1e-12, atol=1e-12)  # fp64 path
    torch.testing.assert_close(hadamard_transform(x.to(device), inverse=True).cpu(), x @ dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [256, 172, 28 * 64, 16384])
def test_round_trip_and_norm(device, n):
    x = torch.randn(4, n, device=device)
    y = hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)  # orthonormal
    torch.testing.assert_close(hadamard_transform(y, inverse=True), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_dtype(device, dtype):
    x = torch.randn(8, 20 * 32, device=device).to(dtype)
    y = hadamard_transform(x)
    assert y.dtype == dtype and y.device == x.device
    ref = kron_reference(x.float().cpu(), 32, 20)
    # Computed in fp32, rounded once to the output dtype: error <= one ulp of the output (~2^-8 for bf16).
    rtol = 2**-10 if dtype == torch.float16 else 2**-7
    torch.testing.assert_close(y.double().cpu(), ref, rtol=rtol, atol=rtol)


def test_float16_overflow_is_an_error(device):
    """A constant row of 60000 transforms to 60000 * sqrt(64) = 480000, past float16's 65504: that used to
    come back as silent infinities. Its float32 transform is the closed form; a row that fits still works."""
    x = torch.full((2, 64), 60000.0, device=device)
    with pytest.raises(ValueError, match=r"exceeds float16's range .*float32 or bfloat16"):
        ops.hadamard_transform(x.half(), None)
    y = ops.hadamard_transform(x, None)
    torch.testing.assert_close(y[:, 0].cpu(), torch.full((2,), 480000.0))  # first entry: sum / sqrt(n)
    small = ops.hadamard_transform(torch.full((2, 64), 8000.0, device=device).half(), None)  # 64000 < 65504
    assert bool(torch.isfinite(small).all()) and float(small[0, 0]) == 64000.0


def test_rht_refuses_wrong_shapes():
    """Wrong shapes used to broadcast against the sign vectors into a wrong result of another shape."""
    rht = RHT(32, 16, seed=0)
    for call, t, what in ((rht.transform_weight, torch.ones(32, 1), "W"), (rht.transform_weight, torch.ones(16, 32), "W"),
                          (rht.inverse_weight, torch.ones(1, 16), "Wt"),
                          (rht.transform_input_factor, torch.ones(16, 1), "H_in"),
                          (rht.transform_output_factor, torch.ones(16, 16), "H_out"),
                          (rht.input_transform, torch.ones(4, 32), "x"), (rht.output_inverse, torch.ones(4, 16), "y")):
        with pytest.raises(ValueError, match=rf"RHT of a 32 x 16 layer: {what} must have shape"):
            call(t)
    x = torch.randn(3, 5, 16)  # batches of the right width still work, against the dense transform
    dense = hadamard_matrix(16).double() * rht.sign_in.double()  # Had_n S_U
    torch.testing.assert_close(rht.input_transform(x).double(), x.double() @ dense.T, rtol=0, atol=1e-5)


def test_non_contiguous_and_batched(device):
    x = torch.randn(6, 128, 3, device=device).transpose(1, 2)  # (6, 3, 128), non-contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(hadamard_transform(x).cpu().double(), kron_reference(x.cpu(), 128, 1), rtol=0, atol=2e-6)


@pytest.mark.parametrize("n", [3, 6, 44, 100, 24 * 7])
def test_unsupported_size_lists_supported_forms(n):
    with pytest.raises(ValueError, match=r"no Hadamard transform of size \d+: supported sizes are 2\^k and 2\^k \* c .*172"):
        hadamard_transform(torch.randn(2, n))


def test_op_bad_inputs(device):
    with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16"):
        ops.hadamard_transform(torch.ones(4, 8, dtype=torch.int64, device=device), None)
    with pytest.raises(ValueError, match=r"must be 2\^k times the order of had \(1\)"):
        ops.hadamard_transform(torch.ones(4, 12, device=device), None)
    with pytest.raises(ValueError, match=r"must be 2\^k times the order of had \(12\)"):
        ops.hadamard_transform(torch.ones(4, 36, device=device), small_hadamard(12).float().to(device))
    with pytest.raises(TypeError, match="had must be float32"):
        ops.hadamard_transform(torch.ones(4, 24, device=device), small_hadamard(12).to(device))
    with pytest.raises(ValueError, match="had must be a square"):
        ops.hadamard_transform(torch.ones(4, 24, device=device), torch.ones(12, 6, device=device))
    with pytest.raises(ValueError, match=r"had is empty \(0 x 0\); pass None"):  # was SIGFPE (n % 0)
        ops.hadamard_transform(torch.ones(4, 8, device=device), torch.ones(0, 0, device=device))


@pytest.mark.parametrize("n", [16, 24, 40])
def test_gradient_is_the_adjoint_transform(device, n):
    """x.grad = M^T g for the dense transform M built here; had made non-symmetric (a column permutation
    of a Hadamard matrix is still one) so that the adjoint's had^T is exercised."""
    _, c = hadamard_factor(n)
    had = small_hadamard(c)[:, torch.randperm(c)] if c > 1 else None
    M = torch.kron(sylvester(n // c), torch.ones(1, 1, dtype=torch.float64) if had is None else had) / math.sqrt(n)
    x = torch.randn(5, n, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.randn(5, n, dtype=torch.float64, device=device)
    y = ops.hadamard_transform(x, None if had is None else had.float().to(device))
    torch.testing.assert_close(y.detach().cpu(), x.detach().cpu() @ M.T, rtol=0, atol=1e-12)  # fp64 maths
    y.backward(g)
    torch.testing.assert_close(x.grad.cpu(), g.cpu() @ M, rtol=0, atol=1e-12)  # fp64: exact up to rounding


def test_gradcheck():
    x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    had = small_hadamard(12)[:, torch.randperm(12)].float()
    assert torch.autograd.gradcheck(lambda t: ops.hadamard_transform(t, had), (x,))


@pytest.mark.parametrize("n", [64, 172, 40])
def test_opcheck(device, n):
    _, c = hadamard_factor(n)
    had = small_hadamard(c).float().to(device) if c > 1 else None
    torch.library.opcheck(torch.ops.yaqa.hadamard_transform.default, (torch.randn(3, n, device=device), had))
    x = torch.randn(3, n, device=device, requires_grad=True)  # the registered backward too
    torch.library.opcheck(torch.ops.yaqa.hadamard_transform.default, (x, had))


@pytest.mark.skipif(not (torch.cuda.is_available() and yaqa_ext.WITH_CUDA), reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("n", [4096, 11008, 14336, 28672])
def test_cuda_matches_cpu_large(n):
    x = torch.randn(16, n)
    torch.testing.assert_close(hadamard_transform(x.cuda()).cpu(), hadamard_transform(x), rtol=0, atol=2e-5)


class TestRHT:
    m, n = 172, 64

    def setup_method(self):
        g = torch.Generator().manual_seed(3)
        self.W = torch.randn(self.m, self.n, generator=g, dtype=torch.float64)
        A = torch.randn(self.n, 2 * self.n, generator=g, dtype=torch.float64)
        B = torch.randn(self.m, 2 * self.m, generator=g, dtype=torch.float64)
        self.H_in, self.H_out = A @ A.T, B @ B.T
        self.rht = RHT(self.m, self.n, seed=11)

    def test_weight_round_trip_and_dense_formula(self):
        Wt = self.rht.transform_weight(self.W)
        Sv, Su = torch.diag(self.rht.sign_out.double()), torch.diag(self.rht.sign_in.double())
        expected = hadamard_matrix(self.m, torch.float64) @ Sv @ self.W @ Su @ hadamard_matrix(self.n, torch.float64).T
        torch.testing.assert_close(Wt, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(self.rht.inverse_weight(Wt), self.W, rtol=1e-12, atol=1e-12)

    def test_proxy_loss_is_invariant(self):
        dW = torch.randn(self.m, self.n, dtype=torch.float64)
        loss = torch.trace(dW @ self.H_in @ dW.T @ self.H_out)
        dWt = self.rht.transform_weight(dW)
        Hi, Ho = self.rht.transform_input_factor(self.H_in), self.rht.transform_output_factor(self.H_out)
        torch.testing.assert_close(torch.trace(dWt @ Hi @ dWt.T @ Ho), loss, rtol=1e-10, atol=0)

    def test_layer_output_through_transformed_weight(self):
        x = torch.randn(7, self.n, dtype=torch.float64)
        Wt = self.rht.transform_weight(self.W)
        y = self.rht.output_inverse(self.rht.input_transform(x) @ Wt.T)
        torch.testing.assert_close(y, x @ self.W.T, rtol=1e-10, atol=1e-10)

    def test_seeded(self):
        assert torch.equal(RHT(self.m, self.n, seed=11).sign_in, self.rht.sign_in)
        assert not torch.equal(RHT(self.m, self.n, seed=12).sign_in, self.rht.sign_in)

    def test_unsupported_shape(self):
        with pytest.raises(ValueError, match="no Hadamard transform of size 44"):
            RHT(44, 64)
