"""The E8P lattice codebook: its codewords against the lattice built here from its definition, nearest-codeword
search against brute force over all 2^16 codewords, adaptive rounding against the naive tile rule, storage round
trips, the fused matmul against dequantize-then-matmul, and a quantized model through save / from_pretrained."""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
from conftest import CUDA_OK, tiny_model
from reference import native_half_gemm, quantized_matmul_reference, tile_ldlq_reference
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from yaqa_ext import QuantConfig, QuantizedLinear, block_ldl, ldlq_round, ops, quantize
from yaqa_ext.codebooks import E8PCodebook, E8PGrid, e8p_abs_grid
from yaqa_ext.hadamard import RHT


@functools.cache
def lattice_codebook() -> Tensor:
    """The 2^16 codewords from the definition: the 256 positive half-integer patterns of least squared norm (ties
    in lexicographic order), every sign pattern giving an even coordinate sum (a point of E8), shifted by +-1/4."""
    patterns = sorted(itertools.product([0.5, 1.5, 2.5, 3.5], repeat=8), key=lambda a: (sum(v * v for v in a), a))
    points = []
    for a in patterns[:256]:
        for signs in itertools.product([1, -1], repeat=8):
            p = [s * v for s, v in zip(signs, a)]
            if sum(p) % 2 == 0:
                points += [[v + 0.25 for v in p], [v - 0.25 for v in p]]
    return torch.tensor(points)


def sorted_rows(t: Tensor) -> Tensor:
    for k in reversed(range(t.size(1))):
        t = t[torch.sort(t[:, k], stable=True).indices]
    return t


def nearest(x: Tensor, scale: float | Tensor) -> Tensor:
    """Brute force: each 8-vector of x (..., 8) replaced by the nearest codeword times ``scale`` (fp32 products)."""
    book = lattice_codebook()
    points = book * torch.as_tensor(scale).reshape(-1, 1, 1)  # (rows or 1, 65536, 8)
    flat = x.reshape(points.size(0) if points.size(0) > 1 else 1, -1, 8)
    best = torch.cdist(flat.double(), points.double()).argmin(-1)  # (rows, units)
    return torch.take_along_dim(points, best.unsqueeze(-1), 1).reshape(x.shape)


def test_codewords_are_the_shifted_lattice_points():
    grid = e8p_abs_grid()
    norms = grid.square().sum(1)
    assert int((norms <= 10).sum()) == 227 and float(norms.max()) == 12  # all of the first shells, then 29 of norm 12
    codes = torch.arange(2**16, dtype=torch.int32).reshape(1, -1)
    decoded = E8PGrid(torch.ones(1, 1), 2).decode(codes).reshape(-1, 8)
    assert torch.equal(sorted_rows(decoded), sorted_rows(lattice_codebook()))  # a bijection onto the 2^16 points


@pytest.mark.parametrize("magnitude", [0.3, 1.0, 3.0])
def test_round_to_nearest_is_the_nearest_codeword(magnitude):
    g = torch.Generator().manual_seed(int(magnitude * 10))
    W = torch.randn(6, 64, generator=g) * magnitude
    scales = torch.tensor([0.5, 0.75, 1.0, 1.25, 2.0, 0.125]).unsqueeze(1)
    W_hat, _ = ops.ldlq_round_e8p(W, None, None, scales, e8p_abs_grid(), 2, 1, 8)
    ref = nearest(W, scales)
    ours_d = (W - W_hat).reshape(6, 8, 8).square().sum(-1)
    ref_d = (W - ref).reshape(6, 8, 8).square().sum(-1)
    torch.testing.assert_close(ours_d, ref_d, rtol=1e-5, atol=1e-6)  # the same distance (a tie may pick either)
    assert torch.equal(W_hat, ref)  # these seeds have no ties


@pytest.mark.parametrize("bits", [3, 4])
def test_residual_stage_rounds_the_error(bits):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(4, 32, generator=g)
    scales = torch.tensor([[0.9, 0.3], [1.1, 0.25], [1.0, 0.3], [0.8, 0.2]])
    W_hat, codes = ops.ldlq_round_e8p(W, None, None, scales, e8p_abs_grid(), bits, 1, 8)
    first = nearest(W, scales[:, :1])
    r = W - first
    second = torch.where(r < 0, -scales[:, 1:], scales[:, 1:]) if bits == 3 else nearest(r, scales[:, 1:])
    assert torch.equal(W_hat, first + second)
    assert torch.equal(E8PGrid(scales, bits).decode(codes), W_hat)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_beats_every_scalar_quantizer_on_gaussians(bits):
    """Per-weight MSE on N(0, 1) below the Lloyd-Max (optimal non-uniform scalar) quantizer of the same rate:
    0.1175, 0.03454, 0.009497 for 4, 8, 16 levels (Max 1960) at 2 and 3 bits, and below the optimal uniform
    16-level quantizer (0.01154) at 4; never below the rate-distortion bound 2^(-2 bits)."""
    W = torch.randn(512, 512, generator=torch.Generator().manual_seed(7))
    grid = E8PCodebook(bits, "tensor").fit(W)
    mse = float((grid.decode(grid.encode(W)) - W).square().mean())
    bound = {2: 0.1175, 3: 0.03454, 4: 0.01154}[bits]
    assert 2.0 ** (-2 * bits) < mse < bound


def ldl_factor(n: int, seed: int, b: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, n, dtype=torch.float64)
    H = X.T @ X
    H = H / H.diagonal().mean() + 1e-2 * torch.eye(n, dtype=torch.float64)
    return block_ldl(H, b).L.float()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(("m", "n", "td_x", "td_y"), [(8, 32, 2, 8), (6, 48, 3, 16), (16, 16, 1, 8)])
def test_ldlq_matches_the_naive_tile_rule(device, bits, m, n, td_x, td_y):
    g = torch.Generator().manual_seed(m * n + bits)
    W = torch.randn(m, n, generator=g)
    L_in, L_out = ldl_factor(n, 1, td_y), ldl_factor(m, 2, td_x)
    grid = E8PCodebook(bits).fit(W)
    s = grid.scales

    def round_tile(x: Tensor, rows: slice, cols: slice) -> tuple[Tensor, Tensor]:
        first = nearest(x, s[rows, :1])
        if bits == 2:
            return first, torch.zeros(x.size(0), x.size(1) // 8, dtype=torch.int32)
        r = x - first
        second = torch.where(r < 0, -s[rows, 1:], s[rows, 1:]) if bits == 3 else nearest(r, s[rows, 1:])
        return first + second, torch.zeros(x.size(0), x.size(1) // 8, dtype=torch.int32)

    ref, _ = tile_ldlq_reference(W, L_in, L_out, td_x, td_y, round_tile, (m, n // 8), torch.int32)
    on = {"device": device}
    ours = ldlq_round(W.to(**on), L_in.to(**on), L_out.to(**on), quantizer=E8PGrid(s.to(**on), bits), td_x=td_x,
                      td_y=td_y)
    # The reference sums the feedback in fp64 and ours in fp32: a codeword could only differ at a near-tie, which
    # these seeds do not hit.
    assert torch.equal(ours.W_hat.cpu(), ref)
    assert torch.equal(grid.decode(ours.codes.cpu()), ref)  # the codes are exactly the values


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_unpack_round_trip(bits):
    W = torch.randn(24, 40, generator=torch.Generator().manual_seed(bits))
    grid = E8PCodebook(bits).fit(W)
    codes = grid.encode(W)
    layer = nn.Module()
    layer.out_features, layer.in_features, layer.layout = 24, 40, grid.layout()
    E8PCodebook.create_weights(layer, 40, 24, **grid.layout())
    E8PCodebook.pack(layer, codes, grid)
    assert layer.qweight.shape == (24, 5 * bits) and layer.qweight.dtype == torch.uint8
    back, grid_back = E8PCodebook.unpack(layer)
    assert torch.equal(back, codes) and torch.equal(grid_back.scales, grid.scales)


def packed_layer(m: int, n: int, bits: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """qweight, scales (fp16), and the dequantized weight decoded by the codebook (checked above)."""
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    grid = E8PCodebook(bits).fit(W)
    codes = grid.encode(W)
    layer = nn.Module()
    E8PCodebook.create_weights(layer, n, m, **grid.layout())
    E8PCodebook.pack(layer, codes, grid)
    return layer.qweight, layer.scales, grid.decode(codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(("m", "n"), [(24, 40), (576, 576), (1536, 576), (64, 1536)])
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_matmul_matches_dequantize_then_matmul(bits, m, n, tokens):
    qweight, scales, W_hat = packed_layer(m, n, bits, m + n)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens))
    y = ops.e8p_matmul(x, qweight, scales, e8p_abs_grid(), bits)
    ref = (x.double() @ W_hat.double().T).float()
    # fp32 accumulation of n products in another order: ~sqrt(n) ulp of the row's magnitude
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rht", [False, True])
@pytest.mark.parametrize("tokens", [1, 40])
def test_matmul_dtypes_and_rht(dtype, rht, tokens):
    m, n, bits = 48, 576, 4
    qweight, scales, W_hat = packed_layer(m, n, bits, 3)
    x = torch.randn(2, tokens, n, generator=torch.Generator().manual_seed(4)).to(dtype)
    t = RHT(m, n, seed=5) if rht else None
    y = ops.e8p_matmul(x, qweight, scales, e8p_abs_grid(), bits, *(() if t is None else t.fused_args(x.device)))
    assert y.dtype == dtype and y.shape == (2, tokens, m)
    # Beyond 16 tokens half-precision activations meet the decoded tiles in a GEMM of their own dtype where the CPU
    # multiplies it natively (as nn.Linear computes such a model); else, and up to 16 tokens, fp32 maths inside
    half_gemm = dtype in (torch.float16, torch.bfloat16) and tokens > 16 and native_half_gemm(dtype)
    ref = quantized_matmul_reference(x, W_hat, t, dtype if half_gemm else None)
    # fp64 in: fp64 maths (1e-10); fp16 / bf16 out: the output's rounding (and fp32 sums, RHT roundings)
    tol = {torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(y.double(), ref.to(dtype).double(), rtol=tol, atol=tol * 4)


def test_opcheck():
    W = torch.randn(8, 32)
    scales = torch.full((8, 2), 0.5)
    torch.library.opcheck(torch.ops.yaqa.ldlq_round_e8p.default, (W, ldl_factor(32, 1, 8), ldl_factor(8, 2, 2), scales,
                                                                  e8p_abs_grid(), 4, 2, 8))
    qweight, s, _ = packed_layer(16, 64, 3, 0)
    t = RHT(16, 64, seed=1)
    for args in ((), t.fused_args(torch.device("cpu"))):
        for tokens in (1, 20):
            torch.library.opcheck(torch.ops.yaqa.e8p_matmul.default,
                                  (torch.randn(tokens, 64), qweight, s, e8p_abs_grid(), 3, *args))


def test_bad_inputs():
    W, grid = torch.randn(8, 32), e8p_abs_grid()
    with pytest.raises(ValueError, match=r"n \(36\) and td_y \(4\) must be multiples of 8"):
        ops.ldlq_round_e8p(torch.randn(8, 36), None, None, torch.ones(8, 1), grid, 2, 1, 4)
    with pytest.raises(ValueError, match=r"scales must be \(8, 2\)"):
        ops.ldlq_round_e8p(W, None, None, torch.ones(8, 1), grid, 4, 1, 8)
    with pytest.raises(ValueError, match="2, 3 or 4 bits"):
        ops.ldlq_round_e8p(W, None, None, torch.ones(8, 1), grid, 8, 1, 8)
    with pytest.raises(ValueError, match="positive half-integers"):
        ops.ldlq_round_e8p(W, None, None, torch.ones(8, 1), grid + 0.25, 2, 1, 8)
    with pytest.raises(ValueError, match="finite and > 0"):
        ops.ldlq_round_e8p(W, None, None, torch.zeros(8, 1), grid, 2, 1, 8)
    qweight, s, _ = packed_layer(16, 64, 2, 0)
    with pytest.raises(ValueError, match=r"qweight must be \(m, n / 8 \* bits\)"):
        ops.e8p_matmul(torch.randn(2, 64), qweight, s, grid, 4)
    with pytest.raises(ValueError, match="group_size must be None"):
        QuantConfig(quantizer="e8p", group_size=64)
    with pytest.raises(ValueError, match="supports bits in"):
        QuantConfig(quantizer="e8p", bits=8)
    with pytest.raises(ValueError, match="multiple of 8 columns"):
        E8PCodebook(2).fit(torch.randn(4, 12))


@pytest.mark.parametrize("bits", [2, 4])
def test_quantized_model_round_trip(tmp_path, bits):
    model = tiny_model("llama")
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2))
    q = copy.deepcopy(model)
    config = QuantConfig(method="yaqa", quantizer="e8p", bits=bits)
    report = quantize(q, config, data=tokens, n_seqs=8, seq_len=16, progress=False)
    assert {r.tiles[1] for r in report.layers} == {8}  # td_y raised to the codebook's 8 columns
    layer = q.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantizedLinear) and layer.codebook == "e8p"
    assert layer.qweight.shape == (16, 24 // 8 * bits)
    x = torch.randn(3, 24)
    codes, grid = layer.book.unpack(layer)
    rht = layer.rht
    W_ref = rht.inverse_weight(grid.decode(codes))  # the original basis
    torch.testing.assert_close(layer(x), x @ W_ref.T, rtol=1e-5, atol=1e-5)  # fp32 products in another order
    q.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, q(tokens).logits)


@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(("m", "n"), [(576, 576), (1536, 576), (40, 64)])
@pytest.mark.parametrize("tokens", [1, 5, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_matmul_matches_dequantize_then_matmul(bits, m, n, tokens, dtype):
    qweight, scales, W_hat = packed_layer(m, n, bits, m + n)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    t = RHT(m, n, seed=1, device="cuda")
    y = ops.e8p_matmul(x.cuda(), qweight.cuda(), scales.cuda(), e8p_abs_grid("cuda"), bits,
                       *t.fused_args(torch.device("cuda")))
    ref = t.output_inverse(t.input_transform(x.cuda().double()) @ W_hat.cuda().double().T)
    # fp32 (fp64) accumulation in another order; bf16: the GEMM's bf16 tiles and output rounding
    tol = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(y.double(), ref.to(dtype).double(), rtol=tol, atol=tol * 4)


@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_opcheck():
    qweight, s, _ = packed_layer(16, 64, 4, 0)
    for tokens in (1, 20):
        torch.library.opcheck(torch.ops.yaqa.e8p_matmul.default, (torch.randn(tokens, 64, device="cuda"), qweight.cuda(),
                                                                  s.cuda(), e8p_abs_grid("cuda"), 4))
