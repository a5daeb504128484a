"""int_matmul (x W_hat^T read from the packed codes) against plain PyTorch: unpack, dequantize, matmul in fp64."""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA_OK

from yaqa_ext import ops
from yaqa_ext.bitpack import pack_codes

needs_cuda = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and a CUDA build")


def packed_weight(m: int, n: int, bits: int, group_size: int, rows: int, seed: int = 0):
    """Random codes (packed), fp16 scales and zero points of ``rows`` rows (1: shared), and the dense W_hat."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (m, n), generator=g).to(torch.uint8)
    s = (torch.rand(rows, n // group_size, generator=g) + 0.05).half()
    z = (torch.rand(rows, n // group_size, generator=g) * (2**bits - 1)).half()
    W = (codes.double() - z.double().repeat_interleave(group_size, 1)) * s.double().repeat_interleave(group_size, 1)
    return pack_codes(codes, bits), s, z, W


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize(("m", "n", "group_size"), [(24, 40, 8), (576, 576, 576), (64, 1536, 128), (1536, 576, 64),
                                                     (7, 13, 13)])
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_matches_dequantize_then_matmul(bits, m, n, group_size, tokens):
    q, s, z, W = packed_weight(m, n, bits, group_size, rows=m, seed=bits)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(1))
    ref = x.double() @ W.T
    y = ops.int_matmul(x, q, s, z, bits, group_size)
    assert y.shape == (tokens, m) and y.dtype == torch.float32
    # fp32 products and sums in another order than the fp64 reference: ~sqrt(n) ulps of the largest output
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 4, 96), (96,), (2, 0, 96)])
def test_activation_dtypes_and_batch_shapes(dtype, shape):
    q, s, z, W = packed_weight(40, 96, 4, 32, rows=1)
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    y = ops.int_matmul(x, q, s, z, 4, 32)
    assert y.shape == (*shape[:-1], 40) and y.dtype == dtype
    ref = x.double() @ W.T
    # fp64 in, fp64 maths (1e-12); half precision in: fp32 maths, one rounding of the output to its dtype
    tol = {torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    if ref.numel():
        torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
# The CPU's few-row transform (up to 2 tokens; small factors of order 12, 20, 36) and its batched path (more tokens,
# or a small factor of order 172 at any count).
@pytest.mark.parametrize(("m", "n", "tokens"), [(576, 1536, 1), (1536, 576, 5), (344, 688, 1), (40, 80, 2),
                                               (48, 64, 64)])
def test_rht_around_the_product(dtype, m, n, tokens):
    """With the sign vectors and small factors of an RHT the op computes ``(H_m^T)((H_n (x S_U)) W_hat^T) S_V``:
    compared with the dense orthonormal Hadamard matrices (hadamard_matrix) applied in fp64."""
    from yaqa_ext.hadamard import RHT, hadamard_matrix

    q, s, z, W = packed_weight(m, n, 4, 64 if n % 64 == 0 else n, rows=m, seed=3)
    rht = RHT(m, n, seed=5)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    y = ops.int_matmul(x, q, s, z, 4, 64 if n % 64 == 0 else n, *rht.fused_args(x.device))
    Hn, Hm = hadamard_matrix(n, torch.float64), hadamard_matrix(m, torch.float64)
    xt = (x.double() * rht.sign_in.double()) @ Hn.T  # x S_U Had_n^T
    ref = ((xt @ W.T) @ Hm) * rht.sign_out.double()  # y Had_m S_V
    assert y.dtype == dtype and y.shape == (tokens, m)
    # fp64: fp64 maths throughout; fp32 / bf16 in: fp32 maths (the transforms add ~log2(n) roundings), one final
    # rounding to bf16
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_rht_argument_checks():
    q, s, z, _ = packed_weight(8, 16, 2, 8, rows=8)
    x = torch.randn(2, 16)
    signs = torch.ones(16)
    cases = [
        ((None, torch.ones(1, 1), None, None), ValueError, "a Hadamard factor was given without sign_in"),
        ((torch.ones(8), None, None, None), ValueError, r"sign_in must be a vector of x's last dimension n = 16"),
        ((signs.double(), None, None, None), TypeError, "sign_in must be float32"),
        ((None, None, torch.ones(16), None), ValueError, r"sign_out must be a vector of the output's m = 8"),
        ((signs, torch.ones(3, 3), None, None), ValueError, r"must be 2\^k times the order of had \(3\)"),
    ]
    for extra, error, match in cases:
        with pytest.raises(error, match=match):
            ops.int_matmul(x, q, s, z, 2, 8, *extra)


def test_non_contiguous_inputs():
    q, s, z, W = packed_weight(32, 64, 3, 16, rows=32)
    x = torch.randn(64, 10).T  # (10, 64), column-major
    y = ops.int_matmul(x, q, s.T.contiguous().T, z, 3, 16)
    torch.testing.assert_close(y.double(), x.double() @ W.T, rtol=0, atol=1e-5 * float((x.double() @ W.T).abs().max()))


def test_bad_inputs():
    q, s, z, _ = packed_weight(8, 16, 2, 8, rows=8)
    x = torch.randn(2, 16)
    cases = [
        ((x.long(), q, s, z, 2, 8), TypeError, "x must be float32"),
        ((x, q, s, z, 9, 8), ValueError, "bits must be in 1..8"),
        ((x, q, s, z, 2, 5), ValueError, "group_size = 5 must divide"),
        ((x, q, s, z, 3, 8), ValueError, r"qweight must be \(m, ceil\(n / 8\) \* bits\) = \(m, 6\)"),
        ((x, q.float(), s, z, 2, 8), TypeError, "qweight must be uint8"),
        ((x, q, s[:, :1], z, 2, 8), ValueError, r"scales must be \(1 or m = 8, n / group_size = 2\)"),
        ((x, q, s, z.double(), 2, 8), TypeError, "zeros must be float16 or float32"),
        ((x[:, :8], q, s, z, 2, 8), ValueError, "qweight must be"),
        ((x.requires_grad_(True), q, s, z, 2, 8), RuntimeError, "x requires grad"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            ops.int_matmul(*args)


@pytest.mark.parametrize("tokens", [1, 16])
@pytest.mark.parametrize("rht", [False, True])
def test_opcheck(tokens, rht):
    from yaqa_ext.hadamard import RHT

    q, s, z, _ = packed_weight(16, 24, 4, 8, rows=16)
    extra = RHT(16, 24, seed=0).fused_args(torch.device("cpu")) if rht else ()
    torch.library.opcheck(torch.ops.yaqa.int_matmul.default, (torch.randn(tokens, 24), q, s, z, 4, 8, *extra))


def test_compiled_quantized_layer_matches_eager():
    """torch.compile traces the layer through the fake kernel and runs the real one: the same outputs."""
    from yaqa_ext.codebooks import IntGrid
    from yaqa_ext.hadamard import RHT
    from yaqa_ext.qlinear import QuantizedLinear
    from yaqa_ext.rounding import Rounded

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (32, 64), generator=g).to(torch.uint8)
    params = IntGrid(bits=4, group_size=64, scales=torch.full((32, 1), 0.125), zeros=torch.full((32, 1), 7.5))
    layer = QuantizedLinear.from_rounding(Rounded(params.decode(codes), codes), params, RHT(32, 64, seed=1), torch.randn(32, generator=g))
    x = torch.randn(3, 64, generator=g)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=1e-6, atol=1e-6)
    dense = x @ layer.weight_matrix().T + layer.bias  # the layer's effective weight, dequantized in plain PyTorch
    torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)


def test_cached_rht_follows_its_sign_buffers():
    """The unpacked sign vectors are cached; writing a sign buffer in place (or loading new ones) must not
    leave the layer computing with the old ones: compared with a fresh layer built from the same state."""
    from yaqa_ext.codebooks import IntGrid
    from yaqa_ext.hadamard import RHT
    from yaqa_ext.qlinear import QuantizedLinear
    from yaqa_ext.rounding import Rounded

    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 4, (16, 32), generator=g).to(torch.uint8)
    params = IntGrid(bits=2, group_size=32, scales=torch.full((16, 1), 0.25), zeros=torch.full((16, 1), 1.5))
    layer = QuantizedLinear.from_rounding(Rounded(params.decode(codes), codes), params, RHT(16, 32, seed=2), None)
    x = torch.randn(2, 32, generator=g)
    before = layer(x)
    layer.sign_in ^= 0b1011  # flip a few input signs in place
    fresh = QuantizedLinear(**layer.spec())
    fresh.load_state_dict(layer.state_dict())
    after = layer(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, fresh(x), rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_quantized_model_matches_eager(shared):
    """torch.compile of a whole quantized stories260K (every layer through the fused op with its RHT) gives the
    eager logits."""
    import copy

    from yaqa_ext import QuantConfig, quantize
    from yaqa_ext.models import load_model

    model, _ = load_model(str(shared / "models" / "stories260K"))
    q = copy.deepcopy(model)
    quantize(q, QuantConfig(method="rtn", bits=4), progress=False)
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = q(tokens).logits
        compiled = torch.compile(q)(tokens).logits
    # the compiled graph fuses the elementwise ops around the kernels differently: fp32 rounding only
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_weight_property_is_cached_until_a_buffer_changes():
    """``.weight`` is computed once, then reused; writing a buffer in place gives the new effective weight (the
    same as a fresh layer built from the same state)."""
    from yaqa_ext.codebooks import IntGrid
    from yaqa_ext.hadamard import RHT
    from yaqa_ext.qlinear import QuantizedLinear
    from yaqa_ext.rounding import Rounded

    codes = torch.randint(0, 8, (16, 32), generator=torch.Generator().manual_seed(4)).to(torch.uint8)
    params = IntGrid(bits=3, group_size=32, scales=torch.full((16, 1), 0.5), zeros=torch.full((16, 1), 3.5))
    layer = QuantizedLinear.from_rounding(Rounded(params.decode(codes), codes), params, RHT(16, 32, seed=1), None)
    first = layer.weight
    assert layer.weight is first
    torch.testing.assert_close(first, layer.weight_matrix(), rtol=0, atol=0)
    layer.scales.mul_(2)
    fresh = QuantizedLinear(**layer.spec())
    fresh.load_state_dict(layer.state_dict())
    assert layer.weight is not first
    torch.testing.assert_close(layer.weight, fresh.weight_matrix(), rtol=0, atol=0)
    torch.testing.assert_close(layer.weight, 2 * first, rtol=1e-6, atol=0)  # the scale doubles W (fp32 rounding)


@needs_cuda
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("m", "n", "group_size"), [(576, 576, 576), (1536, 576, 64), (7, 13, 13), (64, 1536, 3)])
@pytest.mark.parametrize("tokens", [1, 5, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_matches_dequantize_then_matmul(bits, m, n, group_size, tokens, dtype):
    """The CUDA GEMV (<= 16 tokens) and tile + GEMM path (more) against the fp64 dequantize-then-matmul reference,
    with and without the RHT around the product."""
    from yaqa_ext.hadamard import RHT

    q, s, z, W = packed_weight(m, n, bits, group_size, rows=m, seed=bits)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    ref = x.double() @ W.T
    y = ops.int_matmul(x.cuda(), q.cuda(), s.cuda(), z.cuda(), bits, group_size)
    assert y.shape == (tokens, m) and y.dtype == dtype and y.is_cuda
    # fp64: fp64 maths; fp32: sums in another order (~sqrt(n) ulps); bf16: the tile GEMM rounds W_hat to bf16
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y.cpu().double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    if m in (576, 1536) and n in (576, 1536):
        rht = RHT(m, n, seed=2)
        y = ops.int_matmul(x.cuda(), q.cuda(), s.cuda(), z.cuda(), bits, group_size, *rht.fused_args(torch.device("cuda")))
        want = ops.int_matmul(x, q, s, z, bits, group_size, *rht.fused_args(torch.device("cpu")))
        torch.testing.assert_close(y.cpu().double(), want.double(), rtol=tol, atol=tol * float(want.abs().max()))


@needs_cuda
def test_cuda_opcheck():
    from yaqa_ext.hadamard import RHT

    q, s, z, _ = packed_weight(16, 24, 4, 8, rows=16)
    for tokens in (1, 32):
        for extra in ((), RHT(16, 24, seed=0).fused_args(torch.device("cuda"))):
            args = (torch.randn(tokens, 24).cuda(), q.cuda(), s.cuda(), z.cuda(), 4, 8, *extra)
            torch.library.opcheck(torch.ops.yaqa.int_matmul.default, args)
