"""Calibration-free mode: partner detection, proxy factors against brute force, the column-scale search."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from yaqa_ext import QuantConfig, quantize
from yaqa_ext.datafree import Partner, activation_rho, find_partners, proxy_factors
from yaqa_ext.hessians import find_targets, weight_matrix


def gqa_llama():
    """A tiny Llama with grouped-query attention: 4 query heads share 2 key/value heads of dimension 8."""
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def test_partners_of_each_family():
    model = gqa_llama()
    partners = find_partners(model, find_targets(model))
    p = "model.layers.1."
    assert partners[p + "self_attn.v_proj"] == Partner("first", p + "self_attn.o_proj", "head")
    assert partners[p + "self_attn.o_proj"] == Partner("second", p + "self_attn.v_proj", "head")
    assert partners[p + "mlp.up_proj"] == Partner("first", p + "mlp.down_proj", "gated")
    assert partners[p + "mlp.gate_proj"] == Partner("first", p + "mlp.down_proj", "gate")
    assert partners[p + "mlp.down_proj"] == Partner("second", p + "mlp.up_proj", "gated")  # H_I from the linear branch
    assert p + "self_attn.q_proj" not in partners and p + "self_attn.k_proj" not in partners
    opt = tiny_model("opt")
    assert {n.split(".", 4)[-1]: q.kind for n, q in find_partners(opt, find_targets(opt)).items()
            if ".layers.0." in n} == {"self_attn.v_proj": "head", "self_attn.out_proj": "head", "fc1": "mlp", "fc2": "mlp"}
    gpt2 = tiny_model("gpt2")  # fused c_attn holds q, k and v: only the MLP pairs
    assert sorted(n for n in find_partners(gpt2, find_targets(gpt2)) if ".h.0." in n) == \
        ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]


def test_attention_proxies_equal_the_per_head_product_error():
    """tr(dV^T H_O dV) = sum_h ||O_h dV_g(h)||^2 and tr(dO H_I dO^T) = sum_h ||dO_h V_g(h)||^2, query head h reading
    key/value group g(h) = h // 2, summed head by head (brute force)."""
    model = gqa_llama()
    partners = find_partners(model, find_targets(model))
    v_name, o_name = "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj"
    V = weight_matrix(model.get_submodule(v_name)).double()  # (2 groups * 8, 32)
    O = weight_matrix(model.get_submodule(o_name)).double()  # (32, 4 heads * 8)
    H_in, H_out = proxy_factors(model, v_name, partners[v_name])
    assert H_in is None and H_out.shape == (16, 16)
    g = torch.Generator().manual_seed(0)
    dV = torch.randn(16, 32, generator=g, dtype=torch.float64)
    brute = sum((O[:, 8 * h : 8 * h + 8] @ dV[8 * (h // 2) : 8 * (h // 2) + 8]).square().sum() for h in range(4))
    torch.testing.assert_close(torch.trace(dV.T @ H_out @ dV), brute, rtol=1e-12, atol=0)  # fp64 sums
    H_in, H_out = proxy_factors(model, o_name, partners[o_name])
    assert H_out is None and H_in.shape == (32, 32)
    dO = torch.randn(32, 32, generator=g, dtype=torch.float64)
    brute = sum((dO[:, 8 * h : 8 * h + 8] @ V[8 * (h // 2) : 8 * (h // 2) + 8]).square().sum() for h in range(4))
    torch.testing.assert_close(torch.trace(dO @ H_in @ dO.T), brute, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("arch", "first", "second", "gain"), [
    ("llama", "mlp.up_proj", "mlp.down_proj", lambda gate, up: torch.nn.functional.silu(gate)),
    ("llama", "mlp.gate_proj", "mlp.down_proj",  # silu'(x) = sigmoid(x) (1 + x (1 - sigmoid(x))), times the up branch
     lambda gate, up: torch.sigmoid(gate) * (1 + gate * (1 - torch.sigmoid(gate))) * up),
    ("opt", "fc1", "fc2", lambda z, _: (z > 0).double()),  # ReLU's derivative
])
def test_mlp_proxies_are_the_expected_error_under_iid_gains(arch, first, second, gain):
    """An error dh of the hidden layer reaches the output as W2 (s * dh) with a per-token gain s; for gains drawn
    i.i.d. (Monte Carlo, standard normal pre-activations) E[s s^T] * W2^T W2 is proportional to the first layer's
    proxy H_O, and E[s s^T] * W1 W1^T to the second's H_I (up only: a gate's Gram feeds nothing)."""
    model = tiny_model(arch)
    partners = find_partners(model, find_targets(model))
    prefix = "model.layers.0." if arch == "llama" else "model.decoder.layers.0."
    W2 = weight_matrix(model.get_submodule(prefix + second)).double()
    W1 = weight_matrix(model.get_submodule(prefix + first)).double()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 400_000, W2.shape[1], generator=g, dtype=torch.float64)
    s = gain(a, b)
    moment = s.T @ s / s.shape[0]

    def proportional(H: torch.Tensor, expected: torch.Tensor) -> None:
        scale = torch.trace(expected) / torch.trace(H)
        # Monte Carlo error of the second moments: ~0.5% at 400k samples, relative Frobenius
        assert (H * scale - expected).norm() / expected.norm() < 0.02

    _, H_out = proxy_factors(model, prefix + first, partners[prefix + first])
    proportional(H_out, moment * (W2.T @ W2))
    if "gate" not in first:
        H_in, _ = proxy_factors(model, prefix + second, partners[prefix + second])
        proportional(H_in, moment * (W1 @ W1.T))


def test_activation_rho_closed_forms():
    """ReLU at g ~ N(0, 1): mean 1/sqrt(2 pi), second moment 1/2 -> rho = pi - 1; its derivative: Bernoulli(1/2) -> 1."""
    assert activation_rho("relu", derivative=False) == pytest.approx(torch.pi - 1, rel=1e-6)
    assert activation_rho("relu", derivative=True) == pytest.approx(1.0, rel=1e-3)  # the kink at 0 on the grid


def test_datafree_lowers_the_paired_product_error(shared):
    """What the proxies target, measured directly: the V->O map per head, sum_h ||O_h V_g(h) - O_h^ V_g(h)^||_F^2,
    is reproduced better than by round-to-nearest with the same grid and RHT, layer by layer."""
    from yaqa_ext.models import load_model

    model, _ = load_model(str(shared / "models" / "stories260K"))
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    hd = model.config.hidden_size // heads

    def product_errors(q: torch.nn.Module) -> list[float]:
        out = []
        for layer, orig in zip(q.model.layers, model.model.layers):
            V, O = orig.self_attn.v_proj.weight.detach().double(), orig.self_attn.o_proj.weight.detach().double()
            Vq, Oq = (weight_matrix(m).double() for m in (layer.self_attn.v_proj, layer.self_attn.o_proj))
            out.append(sum(float((O[:, hd * h : hd * (h + 1)] @ V[hd * (h // (heads // kv)) :][:hd]
                                  - Oq[:, hd * h : hd * (h + 1)] @ Vq[hd * (h // (heads // kv)) :][:hd]).square().sum())
                           for h in range(heads)))
        return out

    for bits in (2, 3):
        err = {}
        for method in ("rtn", "datafree"):
            q = copy.deepcopy(model)
            quantize(q, QuantConfig(method=method, bits=bits, rht=False), progress=False)
            err[method] = product_errors(q)
        assert all(d < r for d, r in zip(err["datafree"], err["rtn"])), (bits, err)


def test_column_scale_search_helps_badly_scaled_columns_and_never_hurts():
    """A weight whose input columns span 4 orders of magnitude: the searched scaling lowers ||W - W_hat||_F below
    round-to-nearest's (one scale per row cannot serve both ends); a well-scaled one keeps no scaling or a better one."""
    model = tiny_model("llama")
    target = model.model.layers[0].self_attn.q_proj  # no partner: identity factors
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        target.weight.mul_(torch.logspace(-2, 2, target.in_features)[torch.randperm(target.in_features, generator=g)])
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]  # badly and well scaled
    errors = {}
    for transform in (False, True):
        q = copy.deepcopy(model)
        quantize(q, QuantConfig(method="datafree", bits=3, rht=False, datafree_transform=transform), progress=False)
        errors[transform] = [float((weight_matrix(model.get_submodule(n)) - q.get_submodule(n).weight_matrix())
                                   .square().sum()) for n in names]
        if transform:
            assert q.get_submodule(names[0]).in_scale is not None
    assert errors[True][0] < 0.5 * errors[False][0], errors
    assert errors[True][1] <= errors[False][1], errors
