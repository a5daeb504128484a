"""End-to-end quantization: QuantizedLinear, bits/weight, save/load through transformers, evaluation."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import TINY_ARCHS, tiny_model
from transformers import AutoModelForCausalLM

import yaqa_ext  # noqa: F401  (registers the "yaqa" quantization method with transformers)
from yaqa_ext import IntCodebook, QuantConfig, QuantizedLinear, RHT, evaluate, quantize, round_to_nearest
from yaqa_ext.arch import find_targets
from yaqa_ext.hessians import collect_hessians
from yaqa_ext.bitpack import pack_codes, unpack_codes
from yaqa_ext.config import ungroup_specs


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 172])
def test_pack_unpack_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (5, n), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, (n + 7) // 8 * bits) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_pack_layout_is_little_endian_bit_stream():
    """Closed form: 2-bit codes [1, 2, 3, 0, 0, 0, 0, 0] -> bits 10 01 11 00 ... -> bytes 0b00111001, 0."""
    packed = pack_codes(torch.tensor([[1, 2, 3, 0, 0, 0, 0, 0]], dtype=torch.uint8), 2)
    assert packed.tolist() == [[0b00111001, 0]]


@pytest.mark.parametrize("rht", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_quantized_linear_is_x_w_hat(rht, granularity):
    m, n = 28, 64
    linear = torch.nn.Linear(n, m)
    W = linear.weight.detach()
    transform = RHT(m, n, seed=3) if rht else None
    Wt = transform.transform_weight(W) if rht else W
    params = IntCodebook(3, granularity=granularity, group_size=16).fit(Wt)
    rounded = round_to_nearest(Wt, params)
    layer = QuantizedLinear.from_rounding(rounded, params, transform, linear.bias)
    assert torch.equal(layer.dequantized_weight(), rounded.W_hat)  # exactly the rounding result
    effective = transform.inverse_weight(rounded.W_hat.double()) if rht else rounded.W_hat.double()
    x = torch.randn(4, 9, n)
    expected = x.double() @ effective.T + linear.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)  # fp32 transforms and matmul
    torch.testing.assert_close(layer.weight_matrix().double(), effective, rtol=0, atol=1e-6)


def test_channel_scales_are_diag_c_w_diag_inverse_d():
    """With channel scales (what fine-tuning trains): y = x (diag(c) W diag(1/d))^T + b, on the kernel path and the
    gradient path, and they survive save / reload through the spec."""
    m, n = 28, 64
    linear = torch.nn.Linear(n, m)
    transform = RHT(m, n, seed=4)
    Wt = transform.transform_weight(linear.weight.detach())
    params = IntCodebook(3).fit(Wt)
    rounded = round_to_nearest(Wt, params)
    layer = QuantizedLinear.from_rounding(rounded, params, transform, linear.bias, channel_scales=True)
    c, d = (torch.rand(m) + 0.5).half(), (torch.rand(n) + 0.5).half()
    layer.out_scale.copy_(c)
    layer.in_scale.copy_(d)
    effective = c.double()[:, None] * transform.inverse_weight(rounded.W_hat.double()) / d.double()
    x = torch.randn(5, n, requires_grad=True)
    expected = x.detach().double() @ effective.T + linear.bias.double()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)  # fp32 kernel path
    y = layer(x)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)  # fp32 gradient path
    y.sum().backward()
    torch.testing.assert_close(x.grad.double(), effective.sum(0).expand(5, n), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight_matrix().double(), effective, rtol=0, atol=1e-6)
    again = QuantizedLinear.from_spec(layer.spec())
    again.load_state_dict(layer.state_dict())
    again.check_buffers("layer", layer.spec())
    torch.testing.assert_close(again.weight_matrix(), layer.weight_matrix(), rtol=0, atol=0)


def test_quantized_linear_input_gradient_matches_dense_twin():
    """d/dx of QuantizedLinear with the RHT is d/dx of x @ W_eff^T: W_eff^T g (the RHT's backward)."""
    m, n = 28, 64
    linear = torch.nn.Linear(n, m)
    transform = RHT(m, n, seed=5)
    Wt = transform.transform_weight(linear.weight.detach())
    params = IntCodebook(3).fit(Wt)
    layer = QuantizedLinear.from_rounding(round_to_nearest(Wt, params), params, transform, linear.bias)
    x = torch.randn(4, n, requires_grad=True)
    g = torch.randn(4, m)
    layer(x).backward(g)
    expected = g.double() @ layer.weight_matrix().double()
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-5)  # fp32 transforms and matmul


def test_bits_per_weight_accounting():
    """Codes at `bits` each (rows padded to 8 codes), fp16 scales and zero points (one row when all rows
    share them), and one bit per RHT sign."""
    m, n = 172, 64
    W = torch.randn(m, n)
    cases = [  # quantizer, rows of scales, rows of zeros, groups
        (IntCodebook(2, granularity="tensor"), 1, 1, 1),
        (IntCodebook(3), m, 1, 1),
        (IntCodebook(4, symmetric=False, granularity="group", group_size=16), m, m, 4),
    ]
    for quantizer, scale_rows, zero_rows, groups in cases:
        rht = RHT(m, n) if quantizer.granularity == "tensor" else None
        Wt = rht.transform_weight(W) if rht else W
        p = quantizer.fit(Wt)
        layer = QuantizedLinear.from_rounding(round_to_nearest(Wt, p), p, rht, None)
        stored_bits = m * math.ceil(n / 8) * quantizer.bits * 8 + (scale_rows + zero_rows) * groups * 16
        if rht is not None:
            stored_bits += (math.ceil(m / 8) + math.ceil(n / 8)) * 8
        assert layer.bits_per_weight() == pytest.approx(stored_bits / (m * n))


@pytest.fixture(scope="module")
def stories(shared):
    from yaqa_ext.models import load_model

    return load_model(str(shared / "models" / "stories260K"))


@pytest.fixture(scope="module")
def eval_tokens(stories):
    from yaqa_ext.data import corpus_texts, prepare_tokens

    return prepare_tokens(corpus_texts("evaluation"), stories[1], 16, 128)


@pytest.fixture(scope="module")
def stories_factors(stories, tmp_path_factory):
    from yaqa_ext.data import corpus_texts

    out = tmp_path_factory.mktemp("factors")
    collect_hessians(stories[0], corpus_texts("calibration"), out, tokenizer=stories[1], sketch="B", n_seqs=32,
                     seq_len=128, progress=False)
    return out


def test_rtn_8_bits_nearly_lossless_and_error_grows_as_bits_fall(stories, eval_tokens):
    model, _ = stories
    kl, ppl = {}, {}
    for bits in (8, 4, 3, 2):
        q = copy.deepcopy(model)
        quantize(q, QuantConfig(method="rtn", bits=bits), progress=False)
        r = evaluate(model, q, eval_tokens, n_seqs=16, seq_len=128)
        kl[bits], ppl[bits] = r.kl, r.ppl_quant / r.ppl_orig
    # 8 bits: ~1e-5 relative weight error per layer; KL ~1e-3 nats/token, perplexity within 1.5%.
    assert kl[8] < 3e-3 and abs(ppl[8] - 1) < 1.5e-2, (kl, ppl)
    assert kl[2] > kl[3] > kl[4] > 50 * kl[8], kl


def test_evaluate_matches_direct_computation(stories, eval_tokens):
    model, _ = stories
    q = copy.deepcopy(model)
    quantize(q, QuantConfig(method="rtn", bits=3), progress=False)
    r = evaluate(model, q, eval_tokens[:4], n_seqs=4, seq_len=128)
    with torch.no_grad():
        lo = torch.log_softmax(model(eval_tokens[:4]).logits.double(), -1)
        lq = torch.log_softmax(q(eval_tokens[:4]).logits.double(), -1)
    kl = torch.nn.functional.kl_div(lq, lo, log_target=True, reduction="sum") / eval_tokens[:4].numel()
    # fp32 logits, statistics from their differences (see _token_stats): ~1e-7 relative, 1e-6 leaves room.
    assert r.kl == pytest.approx(float(kl), rel=1e-6)
    nll = -lo[:, :-1].gather(-1, eval_tokens[:4, 1:, None]).mean()
    assert r.ppl_orig == pytest.approx(math.exp(float(nll)), rel=1e-6)
    nll_q = -lq[:, :-1].gather(-1, eval_tokens[:4, 1:, None]).mean()
    assert r.ppl_quant == pytest.approx(math.exp(float(nll_q)), rel=1e-6)
    assert r.tokens == 512


@pytest.mark.parametrize("case", ["near_lossless", "shifted", "far", "overflow"])
def test_token_statistics_against_fp64_log_softmax(case):
    """KL and NLL sums of fp32 logits against fp64 log-softmax brute force, where the differences are tiny
    (KL ~1e-6, where fp32 log-probabilities would cancel catastrophically), shifted by a constant, large,
    and beyond the exponential's fp32 range (the fp64 fallback)."""
    from yaqa_ext.evaluation import _token_stats

    g = torch.Generator().manual_seed(0)
    a = torch.randn(24, 500, generator=g) * 4
    noise = torch.randn(24, 500, generator=g)
    b = {"near_lossless": a + 1e-3 * noise, "shifted": a + 7.0 + 1e-2 * noise, "far": a + 2 * noise,
         "overflow": a + 100 * (noise > 2).float()}[case]
    targets = torch.randint(0, 500, (24,), generator=g)
    targets[-1] = -1
    kl, nll_a, nll_b = _token_stats(a, b, targets)
    la, lb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    ref_kl = float((la.exp() * (la - lb)).sum())
    # fp32 differences and probabilities: ~1e-6 of the KL (the shift of 7 costs ~1e-7 absolute per token)
    assert kl == pytest.approx(ref_kl, rel=1e-5, abs=1e-8)
    t = targets[:-1, None]
    assert nll_a == pytest.approx(float(-la[:-1].gather(-1, t).sum()), rel=1e-6)
    assert nll_b == pytest.approx(float(-lb[:-1].gather(-1, t).sum()), rel=1e-6)


def test_cached_reference_logits_and_dequantized_twin_give_the_same_kl(stories, eval_tokens):
    """The pipeline's shortcuts: the original's logits computed once give bit-identical results, and the dense
    twin of the quantized model (dequantize) the same KL as QuantizedLinear's own forward, to fp32 rounding."""
    from yaqa_ext import dequantize
    from yaqa_ext.evaluation import reference_logits

    model, _ = stories
    q = copy.deepcopy(model)
    quantize(q, QuantConfig(method="rtn", bits=3), progress=False)
    direct = evaluate(model, q, eval_tokens, n_seqs=16, seq_len=128, batch_size=4)
    cached = evaluate(None, q, eval_tokens, n_seqs=16, seq_len=128, batch_size=4,
                      orig_logits=reference_logits(model, eval_tokens, 4))
    assert cached == direct
    twin = evaluate(model, dequantize(copy.deepcopy(q)), eval_tokens, n_seqs=16, seq_len=128, batch_size=4)
    # fp32 logits of the two forms differ by ~1e-6 relative; KL ~0.5 nats, so 1e-4 relative is loose.
    assert twin.kl == pytest.approx(direct.kl, rel=1e-4) and twin.ppl_quant == pytest.approx(direct.ppl_quant, rel=1e-4)
    with pytest.raises(ValueError, match="do not match"):
        evaluate(None, q, eval_tokens, n_seqs=16, seq_len=128, batch_size=8, orig_logits=reference_logits(model, eval_tokens, 4))
    with pytest.raises(ValueError, match="needs orig_model"):
        evaluate(None, q, eval_tokens, n_seqs=16, seq_len=128)


@pytest.mark.parametrize("method", ["yaqa", "ldlq"])
def test_save_load_round_trip_gives_identical_logits(stories, stories_factors, eval_tokens, tmp_path, method):
    model, tokenizer = stories
    q = copy.deepcopy(model)
    report = quantize(q, QuantConfig(method=method, bits=2), hessians=stories_factors, progress=False)
    assert len(report.layers) == 35 and all(r.damp_in is not None for r in report.layers)
    assert all(r.proxy_two_sided is not None and r.proxy_one_sided is not None for r in report.layers)
    q.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "yaqa" and config["method"] == method and config["bits"] == 2 and config["rht"]
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt")), "no pickle files"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantizedLinear)
    with torch.no_grad():
        assert torch.equal(loaded(eval_tokens[:2]).logits, q(eval_tokens[:2]).logits)
    from yaqa_ext.models import load_model

    again, tok = load_model(str(tmp_path))
    assert tok.encode("Once upon a time") == tokenizer.encode("Once upon a time")
    with torch.no_grad():
        assert torch.equal(again(eval_tokens[:2]).logits, q(eval_tokens[:2]).logits)


def test_yaqa_report_and_lower_kl_than_ldlq_at_4_bits(stories, stories_factors, eval_tokens):
    """The 4-bit result recorded in benchmarks/results/quality.md holds with this smaller calibration set."""
    model, _ = stories
    kl = {}
    for method in ("ldlq", "yaqa"):
        q = copy.deepcopy(model)
        quantize(q, QuantConfig(method=method, bits=4), hessians=stories_factors, progress=False)
        kl[method] = evaluate(model, q, eval_tokens, n_seqs=16, seq_len=128).kl
    assert kl["yaqa"] < kl["ldlq"], kl


@pytest.mark.parametrize("method", ["yaqa", "ldlq"])
def test_rounding_scale_search_never_raises_a_layers_proxy(stories, stories_factors, method):
    """The search includes the fitted scale (factor 1.0) and keeps the least proxy of the factors it feeds back:
    each layer's proxy (the report's, in the original basis) is at most the unsearched one, lower in some."""
    model, _ = stories
    proxies = {}
    for search in (False, True):
        report = quantize(copy.deepcopy(model), QuantConfig(method=method, bits=2, rounding_scale_search=search),
                          hessians=stories_factors, progress=False)
        key = "proxy_two_sided" if method == "yaqa" else "proxy_one_sided"
        proxies[search] = [getattr(r, key) for r in report.layers]
    assert all(s <= p * (1 + 1e-6) for s, p in zip(proxies[True], proxies[False]))  # fp32 rounding of the traces
    assert sum(proxies[True]) < 0.99 * sum(proxies[False])


def test_scaled_int_grid_multiplies_every_codeword():
    grid = IntCodebook(3, granularity="channel").fit(torch.randn(6, 8))
    codes = torch.randint(0, 8, (6, 8), dtype=torch.uint8)
    scaled = grid.scaled(1.2)
    torch.testing.assert_close(scaled.scales, (grid.scales * 1.2).half().float(), rtol=0, atol=0)  # stored in fp16
    torch.testing.assert_close(scaled.decode(codes), grid.decode(codes) * scaled.scales.repeat_interleave(8, 1)
                               / grid.scales.repeat_interleave(8, 1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["yaqa", "datafree"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_pipeline_on_every_architecture(arch, method, tmp_path):
    model = tiny_model(arch)
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    q = copy.deepcopy(model)
    config = QuantConfig(method=method, bits=4, datafree_transform=method == "datafree")
    report = quantize(q, config, data=tokens if method == "yaqa" else None, n_seqs=8, seq_len=16, progress=False)
    assert len(report.layers) == len(find_targets(model))
    assert all(isinstance(q.get_submodule(r.name), QuantizedLinear) for r in report.layers)
    r = evaluate(model, q, tokens, n_seqs=8, seq_len=16)
    assert 0 <= r.kl < 1.0 and math.isfinite(r.ppl_quant)
    q.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, q(tokens).logits)


def test_dead_layer_falls_back_to_round_to_nearest():
    """A zero v_proj makes o_proj's input zero, so its collected H_in is 0: the layer is rounded to nearest
    (the RTN method's codes, same per-layer RHT), with a warning naming it, instead of failing on 0 / 0."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.zero_()
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    q, rtn = copy.deepcopy(model), copy.deepcopy(model)
    with pytest.warns(UserWarning) as caught:
        quantize(q, QuantConfig(method="ldlq", bits=3), data=tokens, n_seqs=8, seq_len=16, progress=False)
    messages = [str(w.message) for w in caught]
    # collect says so when it writes the zero factor, quantize when it falls back (both used to be silent)
    assert any(m.startswith("the factor model.layers.0.self_attn.o_proj.H_in is zero") for m in messages), messages
    assert any(m.startswith("layer model.layers.0.self_attn.o_proj: H_in is zero") for m in messages), messages
    quantize(rtn, QuantConfig(method="rtn", bits=3), progress=False)
    dead = q.model.layers[0].self_attn.o_proj.dequantized_weight()
    assert torch.equal(dead, rtn.model.layers[0].self_attn.o_proj.dequantized_weight())
    live = q.model.layers[0].self_attn.q_proj.dequantized_weight()  # the live layers still use their Hessians
    assert not torch.equal(live, rtn.model.layers[0].self_attn.q_proj.dequantized_weight())


def test_bad_configurations(stories, stories_factors, tmp_path):
    model, _ = stories
    with pytest.raises(ValueError, match=r"supports bits in \(2, 3, 4, 8\), got 5"):
        QuantConfig(bits=5)
    with pytest.raises(ValueError, match="method must be one of"):
        QuantConfig(method="gptq")
    with pytest.raises(ValueError,
                       match=r"quantizer must be a registered codebook, one of \['e8p', 'int', 'trellis'\], got 'lattice'"):
        QuantConfig(quantizer="lattice")
    with pytest.raises(ValueError, match="group_size 128 does not divide the 64 input columns"):
        quantize(copy.deepcopy(model), QuantConfig(method="rtn", group_size=128, rht=False), progress=False)
    with pytest.raises(ValueError, match="needs Hessian factors"):
        quantize(copy.deepcopy(model), QuantConfig(method="yaqa"), progress=False)
    partial = tmp_path / "partial"
    collect_hessians(model, torch.randint(0, 512, (4, 32)), partial, sketch="input", n_seqs=4, seq_len=32, layers=[0],
                     progress=False)
    with pytest.raises(ValueError, match=r"no factors for 28 layers \(first: model.layers.1.self_attn.q_proj\)"):
        quantize(copy.deepcopy(model), QuantConfig(method="ldlq"), hessians=partial, progress=False)
    with pytest.raises(ValueError, match="holds input moments only"):
        quantize(copy.deepcopy(model), QuantConfig(method="yaqa", skip=[r"layers\.[1-4]\."]), hessians=partial,
                 progress=False)
    q = copy.deepcopy(model)
    report = quantize(q, QuantConfig(method="ldlq", skip=[r"layers\.[1-4]\."]), hessians=partial, progress=False)
    assert len(report.layers) == 7 and isinstance(q.model.layers[1].mlp.down_proj, torch.nn.Linear)


def test_missing_or_corrupt_files(stories, tmp_path):
    model, _ = stories
    q = copy.deepcopy(model)
    quantize(q, QuantConfig(method="rtn", bits=4), progress=False)
    q.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="(?i)safetensors|header|deserializ"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("tamper", ["bits", "nan_scale", "missing_qweight", "missing_scales"])
def test_tampered_folder_refuses_to_load(tmp_path, tamper):
    """Folders whose weights disagree with their config used to load and compute garbage (KL 5-10, NaN)."""
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama")
    quantize(model, QuantConfig(method="rtn", bits=2), progress=False)
    model.save_pretrained(tmp_path)
    name = "model.layers.1.mlp.down_proj"
    if tamper == "bits":
        _edit_modules(tmp_path, lambda spec: spec, {name: lambda spec: {**spec, "layout": {**spec["layout"], "bits": 3}}})
    else:
        tensors = load_file(tmp_path / "model.safetensors")
        if tamper == "nan_scale":
            tensors[f"{name}.scales"][0, 0] = float("nan")
        else:
            del tensors[f"{name}.{tamper.removeprefix('missing_')}"]
        save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    expected = {"bits": r"down_proj\.qweight is torch.uint8 \(\d+, \d+\) but the config's layer \(int \{'bits': 3.* needs torch.uint8 \(\d+, \d+\)",
                "nan_scale": r"down_proj\.scales holds non-positive, NaN or infinite values",
                "missing_qweight": r"down_proj\.qweight is missing", "missing_scales": r"down_proj\.scales is missing"}
    with pytest.raises(ValueError, match=expected[tamper]):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def _edit_modules(folder, edit, per_module=None) -> None:
    """Rewrite the saved layer specs, ``edit`` applied to each (``per_module``: name -> edit, for those only), in
    the per-module form of folders saved before the specs were grouped (both load)."""
    config = json.loads((folder / "config.json").read_text())
    saved = config["quantization_config"]["modules"]
    specs = saved if isinstance(saved, dict) else ungroup_specs(saved)
    config["quantization_config"]["modules"] = {k: (per_module or {}).get(k, edit)(v) for k, v in specs.items()}
    (folder / "config.json").write_text(json.dumps(config))


def test_saved_format_versions(tmp_path):
    """A folder saved before codebooks had names (format 0: the INT layout's keys at the top level of each
    module's spec, no codebook or version) loads with identical logits; a format this version does not know is
    refused with a message naming it."""
    model = tiny_model("llama")
    quantize(model, QuantConfig(method="rtn", bits=3, group_size=8), progress=False)
    model.save_pretrained(tmp_path)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(tokens).logits

    def format0(spec: dict) -> dict:
        old = {k: v for k, v in spec.items() if k not in ("codebook", "format_version", "layout")}
        return {**old, **spec["layout"]}

    _edit_modules(tmp_path, format0)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "codebook" not in next(iter(config["quantization_config"]["modules"].values()))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    layer = loaded.model.layers[0].mlp.down_proj
    assert layer.codebook == "int" and layer.layout == {"bits": 3, "group_size": 8, "scale_rows": 16, "zero_rows": 1}
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, want)
    model.save_pretrained(tmp_path)
    _edit_modules(tmp_path, lambda spec: {**spec, "format_version": 99})
    with pytest.raises(ValueError, match="codebook 'int': the saved layer has format version 99; this yaqa_ext reads "
                                         "version 1"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    _edit_modules(tmp_path, lambda spec: {**spec, "codebook": "lattice", "format_version": 1})
    with pytest.raises(ValueError, match=r"unknown codebook 'lattice': the registered ones are \['e8p', 'int', 'trellis'\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    _edit_modules(tmp_path, lambda spec: {**spec, "codebook": "e8p", "format_version": 1})
    with pytest.raises(ValueError, match="codebook 'e8p' cannot store a layer of layout .*quantize the model again"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_bf16_model_round_trip(tmp_path):
    """A model loaded in bf16 (how most checkpoints are used) quantizes, keeps bf16 activations and its fp16
    scales, and reloads with identical logits."""
    tiny_model("llama").save_pretrained(tmp_path / "fp32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    q = copy.deepcopy(model)
    quantize(q, QuantConfig(method="yaqa", bits=4, lowrank_rank=2), data=tokens, n_seqs=8, seq_len=16, progress=False)
    layer = q.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantizedLinear) and layer.scales.dtype == torch.float16
    with torch.no_grad():
        logits = q(tokens).logits
    assert logits.dtype == torch.bfloat16
    assert evaluate(model, q, tokens, n_seqs=8, seq_len=16).kl < 1e-2  # 4 bits + rank 2 on a random tiny model
    q.save_pretrained(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    assert loaded.model.layers[0].mlp.down_proj.scales.dtype == torch.float16
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, logits)
    dense = yaqa_ext.dequantize(loaded)  # bf16 nn.Linear layers: the model stays usable in bf16
    assert dense.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        # the same weights rounded once more to bf16 and a bf16 matmul instead of the RHT path: a couple of bf16
        # steps (2^-9 at logits ~0.3) of difference; the quantization itself moves logits by ~7e-3
        torch.testing.assert_close(dense(tokens).logits.float(), logits.float(), rtol=0, atol=4e-3)


def test_quantize_leaves_the_callers_config_alone(stories):
    """The config records each layer's shape in a copy (the model's), never in the caller's object, which can be
    reused for another model."""
    model, _ = stories
    config = QuantConfig(method="rtn", bits=4)
    before = config.to_dict()
    report = quantize(copy.deepcopy(model), config, progress=False)
    assert config.to_dict() == before and config.modules == {}
    assert report.config is not config and len(report.config.modules) == len(report.layers) == 35
    assert {**report.config.to_dict(), "modules": {}} == before


def test_a_registered_method_drives_quantize_pipeline_and_cli(stories, stories_factors):
    """A method registered from outside the package (here GPTQ-style one-sided feedback read from a Sketch B
    collection's H_in) is accepted by QuantConfig, rounds as its feedback says (the same codes as 'ldlq' on the
    same factors), and appears among the pipeline's experiments and the CLI's choices."""
    from yaqa_ext import cli
    from yaqa_ext.methods import METHODS, Method, pipeline_methods, register_method

    model, _ = stories
    register_method(Method("gptq-b", "one-sided, H_in of a Sketch B collection", (True, False), ("B",), "B",
                           {"gptq-B": "B"}))
    try:
        ours, ldlq = copy.deepcopy(model), copy.deepcopy(model)
        quantize(ours, QuantConfig(method="gptq-b", bits=3), hessians=stories_factors, progress=False)
        quantize(ldlq, QuantConfig(method="ldlq", bits=3), hessians=stories_factors, progress=False)
        for (name, a), b in zip(ours.named_modules(), ldlq.modules()):
            if isinstance(a, QuantizedLinear):
                assert torch.equal(a.qweight, b.qweight), name
        assert pipeline_methods()["gptq-B"] == ("gptq-b", "B")
        with pytest.raises(SystemExit):
            cli._parser().parse_args(["quantize", "--out", "x", "--method", "nope"])
        assert cli._parser().parse_args(["quantize", "--out", "x", "--method", "gptq-b"]).method == "gptq-b"
        with pytest.raises(ValueError, match=r"method 'gptq-b' rounds with factors of the sketches \('B',\), not 'A'"):
            quantize(copy.deepcopy(model), QuantConfig(method="gptq-b"), data=["some text"], sketch="A",
                     tokenizer=stories[1], progress=False)
    finally:
        del METHODS["gptq-b"]


def test_config_is_plain_and_its_hugging_face_form_round_trips(stories, tmp_path):
    """QuantConfig is a plain dataclass; the model carries its Hugging Face form (quant_method 'yaqa' plus the
    same fields, the layer specs grouped), which config.json holds and from_pretrained reads back to an equal QuantConfig."""
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from yaqa_ext.hf import YaqaHfConfig

    assert not isinstance(QuantConfig(), QuantizationConfigMixin)
    model, _ = stories
    q = copy.deepcopy(model)
    report = quantize(q, QuantConfig(method="rtn", bits=3, group_size=4), progress=False)
    hf = q.config.quantization_config
    assert isinstance(hf, YaqaHfConfig) and hf.quant_method == "yaqa" and hf.quant_config() == report.config
    q.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    fields = json.loads(json.dumps(report.config.to_dict()))
    assert ungroup_specs(saved.pop("modules")) == fields.pop("modules")  # the layer specs grouped by shape
    assert saved.pop("format_version") == 2 and saved == {"quant_method": "yaqa", **fields}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.quantization_config.quant_config() == report.config
    with pytest.raises(ValueError, match="method must be one of"):
        YaqaHfConfig(method="gptq")


def test_quantize_on_load_for_the_data_free_methods(stories, eval_tokens, tmp_path):
    """from_pretrained(plain folder, quantization_config=YaqaHfConfig(method='rtn')) is quantize() on the loaded
    model; it saves and reloads; a method that needs calibration data is refused with what to do."""
    from yaqa_ext.hf import YaqaHfConfig

    model, _ = stories
    model.save_pretrained(tmp_path / "plain")
    for method in ("rtn", "datafree"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain",
                                                      quantization_config=YaqaHfConfig(method=method, bits=4))
        assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantizedLinear)
        reference = copy.deepcopy(model)
        quantize(reference, QuantConfig(method=method, bits=4), progress=False)
        with torch.no_grad():
            assert torch.equal(loaded(eval_tokens[:2]).logits, reference(eval_tokens[:2]).logits)
    loaded.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(eval_tokens[:2]).logits, loaded(eval_tokens[:2]).logits)
    with pytest.raises(ValueError, match="needs calibration data.*yaqa_ext.quantize"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "plain", quantization_config=YaqaHfConfig(method="ldlq"))
    with pytest.raises(ValueError, match="lowrank_method 'qera-exact' needs calibration data"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "plain", quantization_config=YaqaHfConfig(
            method="rtn", lowrank_rank=4, lowrank_method="qera-exact"))
