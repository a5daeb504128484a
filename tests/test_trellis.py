"""Bitshift trellis codes: the encoder's sequences against a plain-PyTorch Viterbi (the least-cost path over every
state), adaptive rounding against the naive tile rule, the Gaussian MSE against known bounds, storage round trips,
and a quantized model through save / from_pretrained."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
import transformers as tf
from conftest import CUDA_OK
from reference import native_half_gemm, quantized_matmul_reference, tile_ldlq_reference
from torch import Tensor, nn

from yaqa_ext import QuantConfig, QuantizedLinear, block_ldl, ldlq_round, ops, quantize
from yaqa_ext.bitpack import pack_codes
from yaqa_ext.codebooks import TrellisCodebook, TrellisGrid, trellis_table
from yaqa_ext.config import ungroup_specs


def least_path(y: Tensor, w: Tensor, table: Tensor, bits: int, ends: int | None = None) -> tuple[Tensor, float]:
    """The least weighted squared error state sequence for targets y (T) by dynamic programming over all 2^L
    states (state_t = state_{t-1} >> bits | symbol << (L - bits)): its states and its cost. ``ends``: the first
    state's low L - bits bits and the last state's top ones must equal it."""
    S = table.numel()
    states = torch.arange(S)
    J = S >> bits
    pred = torch.stack([((states % J) << bits) | q for q in range(2**bits)], 1)  # (S, Q)
    cost = w[0] * (y[0] - table) ** 2
    if ends is not None:
        cost = torch.where(states % J == ends, cost, torch.inf)
    back = []
    for t in range(1, y.numel()):
        best, arg = cost[pred].min(1)
        back.append(pred[states, arg])
        cost = best + w[t] * (y[t] - table) ** 2
    if ends is not None:
        cost = torch.where(states // 2**bits == ends, cost, torch.inf)
    state = int(cost.argmin())
    path = [state]
    for b in reversed(back):
        state = int(b[state])
        path.append(state)
    return torch.tensor(path[::-1]), float(cost.min())


def viterbi_reference(y: Tensor, w: Tensor, table: Tensor, bits: int, tail_biting: bool = False
                      ) -> tuple[Tensor, float]:
    """The values and cost of the encoder's sequence: the least-cost one, or tail-biting the least-cost one whose
    ends share the bits that weight 0's state has in the least-cost path across the wrap (y's last 32 targets,
    then its first 32)."""
    ends = None
    if tail_biting:
        across, _ = least_path(torch.cat([y[-32:], y[:32]]), torch.cat([w[-32:], w[:32]]), table, bits)
        ends = int(across[32]) % (table.numel() >> bits)
    path, cost = least_path(y, w, table, bits, ends)
    return table[path], cost


def unit_targets(x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """A 16 x 16 unit's scaled targets and weights in sequence order (row-major), for row scales s (16, 1)."""
    return (x / s).reshape(-1), (s * s).expand(16, 16).reshape(-1)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("tail_biting", [False, True])
def test_encoder_finds_the_least_cost_sequence(bits, tail_biting):
    g = torch.Generator().manual_seed(bits)
    L = 8 if bits != 3 else 9
    W = torch.randn(16, 32, generator=g)
    scales = (torch.rand(16, 1, generator=g) + 0.5).half().float()
    table = trellis_table(L)
    W_hat, codes = ops.ldlq_round_trellis(W, None, None, scales, table, bits, 16, 16, tail_biting)
    for u in range(2):
        x = W[:, 16 * u:16 * (u + 1)]
        y, w = unit_targets(x, scales)
        ref_values, ref_cost = viterbi_reference(y, w, table, bits, tail_biting)
        ours = (W_hat[:, 16 * u:16 * (u + 1)] / scales).reshape(-1)
        cost = float((w * (y - ours) ** 2).sum())
        assert cost == pytest.approx(ref_cost, rel=1e-5)  # the optimum (fp32 sums in another order)
        torch.testing.assert_close(ours, ref_values, rtol=0, atol=1e-6)  # these seeds have one optimal path
    if tail_biting:  # the stream wraps around: its last states' top symbols are its first ones
        assert torch.equal(codes[:, 256:], codes[:, :(L - bits) // bits])
    assert torch.equal(TrellisGrid(scales, bits, L, tail_biting).decode(codes), W_hat)  # the codes are the values


def test_encoder_is_exact_where_paths_nearly_tie():
    """Targets on a coarse grid make many sequences cost almost the same: the search's fp32 costs must round as
    the scalar rule's (a vector loop with contracted multiply-adds chose another sequence in 1 unit of these 400):
    every unit is the reference's sequence."""
    g = torch.Generator().manual_seed(0)
    bits, units = 1, 400
    table = (torch.arange(16, dtype=torch.float32) - 7.5) * 0.37  # L = 4
    W = torch.randint(-40, 41, (16, 16 * units), generator=g).float() * 0.05
    scales = (torch.rand(16, 1, generator=g) + 0.5).half().float()
    W = W * scales
    W_hat, _ = ops.ldlq_round_trellis(W, None, None, scales, table, bits, 16, 16)
    for u in range(units):
        ref, _ = viterbi_reference(*unit_targets(W[:, 16 * u:16 * (u + 1)], scales), table, bits)
        assert torch.equal(W_hat[:, 16 * u:16 * (u + 1)], ref.view(16, 16) * scales), u


@pytest.mark.parametrize(("bits", "bound"), [(2, 0.0918), (3, 0.0333), (4, 0.0098)])
def test_gaussian_error_beats_e8p_and_scalar_quantizers(bits, bound):
    """Per-weight MSE on N(0, 1) below E8P's with its residual stages (measured: 0.0918, 0.0333, 0.0098) and so
    below the Lloyd-Max scalar quantizers (0.1175, 0.03454, 0.009497); above the rate-distortion bound 2^(-2 bits)."""
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(7))
    grid = TrellisCodebook(bits, "tensor").fit(W)
    mse = float((grid.decode(grid.encode(W)) - W).square().mean())
    assert 2.0 ** (-2 * bits) < mse < bound


def ldl_factor(n: int, seed: int, b: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, n, dtype=torch.float64)
    H = X.T @ X
    return block_ldl(H / H.diagonal().mean() + 1e-2 * torch.eye(n, dtype=torch.float64), b).L.float()


@pytest.mark.parametrize("bits", [2, 3])
def test_ldlq_matches_the_naive_tile_rule(bits):
    m, n, L = 32, 48, 6
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(bits))
    L_in, L_out = ldl_factor(n, 1, 16), ldl_factor(m, 2, 16)
    grid = TrellisCodebook(bits, L=L).fit(W)
    table, s = trellis_table(L), grid.scales

    def round_tile(x: Tensor, rows: slice, cols: slice) -> tuple[Tensor, Tensor]:
        y, w = unit_targets(x, s[rows])
        values, _ = viterbi_reference(y, w, table, bits, tail_biting=True)
        return values.reshape(16, 16) * s[rows], torch.zeros(1, 1, dtype=torch.uint8)

    ref, _ = tile_ldlq_reference(W, L_in, L_out, 16, 16, round_tile, (m, n // 16), torch.uint8)
    ours = ldlq_round(W, L_in, L_out, quantizer=grid, td_x=16, td_y=16)
    # The reference sums the feedback in fp64 and ours in fp32: a path could only differ at a near-tie, which these
    # seeds do not hit.
    assert torch.equal(ours.W_hat, ref)
    assert torch.equal(grid.decode(ours.codes), ref)


def test_pack_unpack_round_trip():
    W = torch.randn(32, 48, generator=torch.Generator().manual_seed(0))
    for tail_biting, width in ((False, 33 * 3), (True, 32 * 3)):
        grid = TrellisCodebook(3, tail_biting=tail_biting).fit(W)
        codes = grid.encode(W)
        layer = nn.Module()
        layer.out_features, layer.in_features, layer.layout = 32, 48, grid.layout()
        TrellisCodebook.create_weights(layer, 48, 32, **grid.layout())
        TrellisCodebook.pack(layer, codes, grid)
        back, grid_back = TrellisCodebook.unpack(layer)
        assert torch.equal(back, codes) and torch.equal(grid_back.scales, grid.scales)
        # 6 units of 256 + 3 symbols of 3 bits padded to whole bytes of 8 symbols; tail-biting: 256 symbols
        assert layer.qweight.shape == (6, width)
    bad = codes.clone()
    bad[0, 256] ^= 1
    with pytest.raises(ValueError, match="must end with their first"):
        TrellisCodebook.pack(layer, bad, grid)


def test_opcheck_and_bad_inputs():
    W, table = torch.randn(16, 32), trellis_table(12)
    for tail_biting in (False, True):
        torch.library.opcheck(torch.ops.yaqa.ldlq_round_trellis.default,
                              (W, ldl_factor(32, 1, 16), None, torch.ones(16, 1), trellis_table(6), 2, 16, 16,
                               tail_biting))
    with pytest.raises(ValueError, match="must be multiples of 16"):
        ops.ldlq_round_trellis(torch.randn(8, 32), None, None, torch.ones(8, 1), table, 2, 8, 16)
    with pytest.raises(ValueError, match="2\\^L state values"):
        ops.ldlq_round_trellis(W, None, None, torch.ones(16, 1), table[:100], 2, 16, 16)
    with pytest.raises(ValueError, match="scales must be at least 1e-19"):
        ops.ldlq_round_trellis(W, None, None, torch.full((16, 1), 1e-30), table, 2, 16, 16)
    with pytest.raises(ValueError, match="multiple of bits"):
        TrellisCodebook(3, L=8)
    with pytest.raises(ValueError, match="multiples of 16"):
        TrellisCodebook(2).fit(torch.randn(24, 16))


def test_quantized_model_round_trip(tmp_path):
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2))
    q = copy.deepcopy(model)
    report = quantize(q, QuantConfig(method="yaqa", quantizer="trellis", bits=2), data=tokens, n_seqs=8, seq_len=16,
                      progress=False)
    assert {r.tiles for r in report.layers} == {(16, 16)}  # tiles raised to the codebook's unit
    layer = q.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantizedLinear) and layer.codebook == "trellis"
    x = torch.randn(3, 48)
    codes, grid = layer.book.unpack(layer)
    W_ref = layer.rht.inverse_weight(grid.decode(codes))
    torch.testing.assert_close(layer(x), x @ W_ref.T, rtol=1e-5, atol=1e-5)  # fp32 products in another order
    q.save_pretrained(tmp_path)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, q(tokens).logits)
    assert layer.qweight.shape[1] == 32 * 2  # tail-biting: 256 symbols of 2 bits per unit

    # The same folder as format 1 wrote it (streams with their own start symbols, no tail_biting in the layout)
    # loads as such, with the same logits.
    config = json.loads((tmp_path / "config.json").read_text())
    specs = config["quantization_config"]["modules"]
    specs = specs if isinstance(specs, dict) else ungroup_specs(specs)
    weights = safetensors.torch.load_file(tmp_path / "model.safetensors")
    for name, spec in specs.items():
        if spec["codebook"] == "trellis":
            codes, _ = q.get_submodule(name).book.unpack(q.get_submodule(name))
            weights[f"{name}.qweight"] = pack_codes(codes, 2)
            specs[name] = {**spec, "format_version": 1,
                           "layout": {k: v for k, v in spec["layout"].items() if k != "tail_biting"}}
    config["quantization_config"]["modules"] = specs
    (tmp_path / "config.json").write_text(json.dumps(config))
    safetensors.torch.save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    old = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert old.model.layers[0].mlp.down_proj.layout == {"bits": 2, "L": 12, "tail_biting": False}
    assert old.model.layers[0].mlp.down_proj.qweight.shape[1] == 33 * 2
    with torch.no_grad():
        assert torch.equal(old(tokens).logits, q(tokens).logits)


def random_layer(m: int, n: int, bits: int, L: int, seed: int, tail_biting: bool = True
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """qweight and scales (fp16) of random symbol streams (every stream is a valid code), and the weight the codebook
    decodes from them (checked above against the encoder's values)."""
    g = torch.Generator().manual_seed(seed)
    grid = TrellisGrid((torch.rand(m, 1, generator=g) + 0.5).half().float(), bits, L, tail_biting)
    p = (L - bits) // bits
    codes = torch.randint(0, 2**bits, ((m // 16) * (n // 16), 256 + p), generator=g).to(torch.uint8)
    if tail_biting:
        codes[:, 256:] = codes[:, :p]
    layer = nn.Module()
    TrellisCodebook.create_weights(layer, n, m, **grid.layout())
    TrellisCodebook.pack(layer, codes, grid)
    return layer.qweight, layer.scales, grid.decode(codes)


@pytest.mark.parametrize(("bits", "L"), [(1, 12), (2, 12), (3, 12), (4, 12), (2, 16), (1, 20), (3, 18), (4, 20)])
@pytest.mark.parametrize(("m", "n"), [(32, 48), (576, 576), (1536, 576)])
@pytest.mark.parametrize("tokens", [1, 5, 64])
@pytest.mark.parametrize("tail_biting", [False, True])
def test_matmul_matches_dequantize_then_matmul(bits, L, m, n, tokens, tail_biting):
    qweight, scales, W_hat = random_layer(m, n, bits, L, m + n + bits, tail_biting)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens))
    y = ops.trellis_matmul(x, qweight, scales, trellis_table(L), bits)
    # fp32 accumulation of n products in another order
    torch.testing.assert_close(y, (x.double() @ W_hat.double().T).float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 40])
def test_matmul_dtypes_and_rht(dtype, tokens):
    from yaqa_ext.hadamard import RHT

    m, n, bits = 48, 576, 2
    qweight, scales, W_hat = random_layer(m, n, bits, 12, 3)
    x = torch.randn(2, tokens, n, generator=torch.Generator().manual_seed(4)).to(dtype)
    t = RHT(m, n, seed=5)
    y = ops.trellis_matmul(x, qweight, scales, trellis_table(12), bits, *t.fused_args(x.device))
    assert y.dtype == dtype and y.shape == (2, tokens, m)
    # beyond 4 tokens bf16 activations meet the decoded tiles in a bf16 GEMM where the CPU has native bf16 products
    # (as nn.Linear computes a bf16 model)
    half_gemm = dtype == torch.bfloat16 and tokens > 4 and native_half_gemm(dtype)
    ref = quantized_matmul_reference(x, W_hat, t, dtype if half_gemm else None)
    tol = {torch.float64: 1e-10, torch.bfloat16: 1.6e-2}[dtype]  # fp64 maths for fp64; bf16: the output's rounding
    torch.testing.assert_close(y.double(), ref.to(dtype).double(), rtol=tol, atol=tol * 4)


def test_matmul_opcheck_and_bad_inputs():
    qweight, scales, _ = random_layer(32, 48, 3, 12, 0)
    for tokens in (1, 20):
        torch.library.opcheck(torch.ops.yaqa.trellis_matmul.default,
                              (torch.randn(tokens, 48), qweight, scales, trellis_table(12), 3))
    with pytest.raises(ValueError, match=r"qweight must be \(\(m / 16\) \(n / 16\)"):
        ops.trellis_matmul(torch.randn(2, 48), qweight[:3], scales, trellis_table(12), 3)
    with pytest.raises(ValueError, match="multiples of 16"):
        ops.trellis_matmul(torch.randn(2, 40), qweight, scales, trellis_table(12), 3)


@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize(("bits", "L"), [(1, 12), (2, 12), (3, 12), (4, 12), (2, 16), (4, 20)])
@pytest.mark.parametrize(("m", "n"), [(576, 576), (1536, 576), (32, 48)])
@pytest.mark.parametrize("tokens", [1, 5, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_matmul_matches_dequantize_then_matmul(bits, L, m, n, tokens, dtype):
    from yaqa_ext.hadamard import RHT

    qweight, scales, W_hat = random_layer(m, n, bits, L, m + n + bits)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    t = RHT(m, n, seed=1, device="cuda")
    y = ops.trellis_matmul(x.cuda(), qweight.cuda(), scales.cuda(), trellis_table(L, "cuda"), bits,
                           *t.fused_args(torch.device("cuda")))
    ref = t.output_inverse(t.input_transform(x.cuda().double()) @ W_hat.cuda().double().T)
    # fp32 (fp64) accumulation in another order; bf16: the GEMM's bf16 tiles and output rounding
    tol = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(y.double(), ref.to(dtype).double(), rtol=tol, atol=tol * 4)


@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_opcheck():
    qweight, scales, _ = random_layer(32, 48, 3, 12, 0)
    for tokens in (1, 20):
        torch.library.opcheck(torch.ops.yaqa.trellis_matmul.default,
                              (torch.randn(tokens, 48, device="cuda"), qweight.cuda(), scales.cuda(),
                               trellis_table(12, "cuda"), 3))


@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize(("bits", "L"), [(1, 8), (2, 12), (3, 12), (4, 12), (2, 14)])
@pytest.mark.parametrize("tail_biting", [False, True])
def test_cuda_search_matches_cpu(bits, L, tail_biting):
    """Round to nearest on CUDA (one thread block per unit's search) chooses the CPU's sequences: the same fp32
    costs, rounded the same way (L = 14 needs more than the default 48 KB of shared memory)."""
    W = torch.randn(64, 96, generator=torch.Generator().manual_seed(bits + L))
    grid = TrellisCodebook(bits, L=L).fit(W)
    args = (grid.scales, trellis_table(L), bits, 16, 32, tail_biting)
    cpu = ops.ldlq_round_trellis(W, None, None, *args)
    gpu = ops.ldlq_round_trellis(W.cuda(), None, None, *(a.cuda() if isinstance(a, Tensor) else a for a in args))
    assert torch.equal(gpu[1].cpu(), cpu[1]) and torch.equal(gpu[0].cpu(), cpu[0])


@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("bits", [2, 4])
def test_cuda_ldlq_follows_the_tile_rule(bits):
    """Two-sided LDLQ on CUDA: each unit is the nearest sequence (the CPU's search) to its target under the naive
    tile rule, with the feedback recomputed in fp64 from the CUDA run's own errors (so a near-tie flipped by the
    fp32 sums' order does not cascade into the check)."""
    m, n, L = 96, 128, 12
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(bits))
    L_in, L_out = ldl_factor(n, 3, 16), ldl_factor(m, 4, 16)
    grid = TrellisCodebook(bits, L=L).fit(W)
    gpu = ldlq_round(W.cuda(), L_in.cuda(), L_out.cuda(), quantizer=grid, td_x=16, td_y=16)
    W_gpu = gpu.W_hat.cpu()
    assert torch.equal(grid.decode(gpu.codes.cpu()), W_gpu)  # the codes are exactly the values
    differ = []

    def round_tile(x: Tensor, rows: slice, cols: slice) -> tuple[Tensor, Tensor]:
        nearest, _ = ops.ldlq_round_trellis(x, None, None, grid.scales[rows], trellis_table(L), bits, 16, 16,
                                            grid.tail_biting)
        differ.append(not torch.equal(nearest, W_gpu[rows, cols]))
        return W_gpu[rows, cols], torch.zeros(1, 1, dtype=torch.uint8)

    tile_ldlq_reference(W, L_in, L_out, 16, 16, round_tile, (m, n // 16), torch.uint8)
    assert len(differ) == (m // 16) * (n // 16) and sum(differ) <= 1  # a near-tie at most


@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and a CUDA build")
def test_cuda_search_opcheck():
    W = torch.randn(16, 32, device="cuda")
    for tail_biting in (False, True):
        torch.library.opcheck(torch.ops.yaqa.ldlq_round_trellis.default,
                              (W, ldl_factor(32, 1, 16).cuda(), None, torch.ones(16, 1, device="cuda"),
                               trellis_table(6, "cuda"), 2, 16, 16, tail_biting))
