"""Calibration-free quantization (CafeQ, ALGORITHMS.md section 8): proxy Kronecker factors from the weights.

Two layers that multiply directly, ``y = W2 W1 x`` (attention V then O, per head group), are rounded
for the error of their product ``||W2 W1 - W2_hat W1_hat||``: the first with ``H_O = W2^T W2``
(``H_I = I``), the second with ``H_I = W1_hat W1_hat^T`` (``H_O = I``), the first already rounded when
the second is. An MLP puts an activation between its matrices (the paper pairs them as an
approximation). There an error ``dh`` of the hidden layer reaches the output as ``W2 (s * dh)`` with a
per-token gain ``s`` (the activation's derivative; for a gated MLP's up branch the gate's activation,
for the gate the derivative times the up branch), so the exact factors are ``E[s s^T] * W2^T W2``
(elementwise) and, for the second matrix, ``E[h h^T]`` of its input ``h``. Both are expectations of
functions of ``z = A x``; for white ``x`` scaled to a mean pre-activation variance of 1 (the one
assumption about the data), the Hermite expansion gives ``E[f(z_i) f(z_j)] = sum_k c_k(v_i) c_k(v_j) C_ij^k``
with ``C`` the correlation matrix of ``A A^T`` and ``c_k(v)`` the Hermite coefficients of ``f`` at
variance ``v_i ~ (A A^T)_ii``: weights only, no data. (A gated MLP's two branches are taken as
independent for the second matrix's input.) A layer with no partner gets identity factors (round to nearest), optionally
after an input-column scaling that lowers ``||W - W_hat||_F``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .arch import TargetModule, architecture_of, decoder_layers, weight_matrix

__all__ = ["Partner", "find_partners", "hermite_coefficients", "proxy_factors"]

log = logging.getLogger("yaqa_ext")

@dataclass(frozen=True)
class Partner:
    role: str  # "first" or "second"
    partner: str  # the module the role pairs with (for a second, the first whose Gram gives H_I)
    kind: str  # "head", "gated", "gate" or "mlp" (see yaqa_ext.arch.PartnerRule), or "gate_up": an MoE expert's
    # fused [gate; up] matrix and its down projection
    other: str | None = None  # gated MLPs: the other branch of the first (up <-> gate); for the second, the gate
    halves: tuple[slice, slice] | None = None  # gate_up: the rows of the gate and of the up projection


def find_partners(model: nn.Module, targets: list[TargetModule]) -> dict[str, Partner]:
    """The partner pairs of the model's architecture (:attr:`yaqa_ext.arch.Architecture.pairs`) present among
    ``targets`` (layers without one: none, logged)."""
    prefix, _ = decoder_layers(model)
    names = {t.name: t for t in targets}
    out: dict[str, Partner] = {}
    for i in sorted({t.layer for t in targets}):
        for rule in architecture_of(model).pairs:
            a, b = f"{prefix}.{i}.{rule.first}", f"{prefix}.{i}.{rule.second}"
            other = None if rule.branch is None else f"{prefix}.{i}.{rule.branch}"
            if a not in names or b not in names or (other is not None and _linear(model, other) is None):
                continue
            if rule.kind == "head":
                heads, kv, hd = _heads(model)
                fits = names[a].out_features == kv * hd and names[b].in_features == heads * hd
            else:
                fits = names[a].out_features == names[b].in_features
            if fits:
                out[a] = Partner("first", b, rule.kind, other)
                if rule.feeds:
                    out[b] = Partner("second", a, rule.kind, other)
    out.update(_expert_partners(targets))
    alone = [n for n in names if n not in out]
    if alone:
        log.info("datafree: %d layers have no partner and get identity factors (e.g. %s)", len(alone), alone[0])
    return out


def _expert_partners(targets: list[TargetModule]) -> dict[str, Partner]:
    """Each MoE expert's first matrix (fused gate_up, or up without a gate) paired with its down projection."""
    names = {t.name for t in targets}
    out: dict[str, Partner] = {}
    for t in targets:
        if t.experts is None:
            continue
        head = t.name.rpartition(f".{t.expert}.")[0]
        first, second = f"{head}.{t.expert}.{t.experts[t.expert].first_name}", f"{head}.{t.expert}.down_proj"
        if first in names and second in names:
            halves = t.experts.gate_up_halves() if t.experts.gated else None
            kind = "mlp" if halves is None else "gate_up"
            out[first], out[second] = Partner("first", second, kind, None, halves), Partner("second", first, kind, None, halves)
    return out


def hermite_coefficients(name: str, derivative: bool, variances: Tensor, order: int = 4) -> tuple[Tensor, Tensor]:
    """Normalised Hermite coefficients ``c_k = E[f(sqrt(v) g) He_k(g)] / sqrt(k!)``, k = 0..order, and
    ``E[f(sqrt(v) g)^2]`` of ``f`` = the activation (or its derivative) at ``g ~ N(0, 1)``, per variance v,
    by quadrature: ``(order + 1, len(v))`` and ``(len(v),)``."""
    from transformers.activations import ACT2FN

    g = torch.linspace(-10.0, 10.0, 1001, dtype=torch.float64, device=variances.device)
    weight = torch.exp(-g**2 / 2) * (g[1] - g[0]) / math.sqrt(2 * math.pi)
    with torch.enable_grad():  # also under no_grad (quantize)
        z = (variances.double().clamp_min(0).sqrt()[:, None] * g).requires_grad_(derivative)
        f = ACT2FN[name](z)
        if derivative:
            (f,) = torch.autograd.grad(f.sum(), z)
    f = f.detach() * weight
    he = [torch.ones_like(g), g]
    for k in range(2, order + 1):
        he.append(g * he[-1] - (k - 1) * he[-2])
    coeffs = torch.stack([f @ he[k] / math.sqrt(math.factorial(k)) for k in range(order + 1)])
    return coeffs, (f * f / weight).sum(1)


def _activation(model: nn.Module) -> str:
    config = model.config
    for key in ("hidden_act", "hidden_activation", "activation_function"):
        if isinstance(getattr(config, key, None), str):
            return getattr(config, key)
    log.info("datafree: no activation in the model config; assuming silu")
    return "silu"


def _heads(model: nn.Module) -> tuple[int, int, int]:
    """(attention heads, key/value heads, head dimension) from the model config."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def _linear(model: nn.Module, name: str) -> Tensor | None:
    """The current (out, in) weight of a linear module (rounded already if it is quantized), or None."""
    try:
        return weight_matrix(model.get_submodule(name)).double()
    except AttributeError:
        return None


def _gain_moment(A: Tensor, activation: str, derivative: bool) -> Tensor:
    """``E[f(z) f(z)^T]`` for ``z = A x``, white ``x`` scaled so that the mean variance of ``z`` is 1, ``f`` the
    activation or its derivative: ``sum_k c_k c_k^T * C^k`` (Hermite expansion to 4th order, elementwise powers of
    the correlation matrix ``C``), with the exact second moments on the diagonal."""
    G = A @ A.T
    var = G.diagonal().clamp_min(0)
    scale = var.sqrt().clamp_min(1e-300)
    C = G / torch.outer(scale, scale)
    coeffs, second = hermite_coefficients(activation, derivative, var / var.mean().clamp_min(1e-300))
    M = sum(torch.outer(c, c) * C**k for k, c in enumerate(coeffs))
    return M - torch.diag(M.diagonal()) + torch.diag(second)


def _first_gain(kind: str, own: Tensor, other: Tensor | None, act: str) -> Tensor:
    """``E[s s^T]`` of how a first MLP matrix's hidden units pass an error on (see the module docstring)."""
    if kind == "gated":  # up: gain act(gate x)
        return _gain_moment(other, act, derivative=False)
    if kind == "gate":  # gate: gain act'(gate x) * (up x)
        return _gain_moment(own, act, derivative=True) * (other @ other.T)
    return _gain_moment(own, act, derivative=True)  # plain MLP: gain act'(W1 x)


def _second_input(kind: str, first: Tensor, other: Tensor | None, act: str) -> Tensor:
    """``E[h h^T]`` of a second MLP matrix's input: act(gate x) * (up x) with the two branches taken as independent
    (gated), or act(W1 x)."""
    if kind == "gated":
        return _gain_moment(other, act, derivative=False) * (first @ first.T)
    return _gain_moment(first, act, derivative=False)


def proxy_factors(model: nn.Module, name: str, partner: Partner | None) -> tuple[Tensor | None, Tensor | None]:
    """``(H_in, H_out)`` of a layer from its own and its partners' current weights (None: identity)."""
    if partner is None:
        return None, None
    W = _linear(model, partner.partner)
    if partner.kind == "gate_up":  # an expert's fused [gate; up]: the gate and up rows as the 'gate' / 'gated' pair
        act, (gate_rows, up_rows) = _activation(model), partner.halves
        if partner.role == "first":
            own = _linear(model, name)
            gate, up, DtD = own[gate_rows], own[up_rows], W.T @ W
            up_white = up / gate.square().sum(1).mean().sqrt()  # up x for the x that gives the gate unit variance
            H = torch.zeros(own.size(0), own.size(0), dtype=own.dtype, device=own.device)
            H[gate_rows, gate_rows] = _first_gain("gate", gate, up_white, act) * DtD
            H[up_rows, up_rows] = _first_gain("gated", up, gate, act) * DtD
            return None, H
        return _second_input("gated", W[up_rows], W[gate_rows], act), None
    if partner.kind != "head":
        act = _activation(model)
        other = None if partner.other is None else _linear(model, partner.other)
        if partner.role == "first":
            return None, _first_gain(partner.kind, _linear(model, name), other, act) * (W.T @ W)
        return _second_input(partner.kind, W, other, act), None
    heads, kv, hd = _heads(model)
    rep = heads // kv
    if partner.role == "first":  # V, partner O: block g = sum over the query heads h of group g of O_h^T O_h
        O = [W[:, h * hd : (h + 1) * hd] for h in range(heads)]
        return None, torch.block_diag(*[sum(O[h].T @ O[h] for h in range(g * rep, (g + 1) * rep)) for g in range(kv)])
    V = [W[g * hd : (g + 1) * hd] for g in range(kv)]  # O, partner V: block h = V_g V_g^T, g the group of h
    return torch.block_diag(*[V[h // rep] @ V[h // rep].T for h in range(heads)]), None
