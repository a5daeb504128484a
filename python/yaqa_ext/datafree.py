"""Calibration-free quantization (CafeQ, ALGORITHMS.md section 8): proxy Kronecker factors from the weights.

Two layers that multiply directly, ``y = W2 W1 x`` (attention V then O, per head group), are rounded
for the error of their product ``||W2 W1 - W2_hat W1_hat||``: the first with ``H_O = W2^T W2``
(``H_I = I``), the second with ``H_I = W1_hat W1_hat^T`` (``H_O = I``), the first already rounded when
the second is. An MLP puts an activation between its two matrices: an error ``dh`` of the hidden
layer reaches the output as ``W2 (s * dh)`` with a per-token gain ``s`` (the activation's derivative,
or for a gated MLP's up branch the gate's activation), so the exact factor is ``E[s s^T] * W2^T W2``
(elementwise). Without data we take ``s`` i.i.d. over the hidden units with the moments of the
activation at a standard normal pre-activation, ``E[s s^T] ~ mu^2 (11^T + rho I)``, ``rho = var / mu^2``:
the proxy is ``G + rho diag(G)`` with ``G`` the partner's Gram matrix (SiLU gives rho = 7.3, ReLU 1).
A gate's error is multiplied by the zero-mean up branch, so its proxy is ``diag(G)`` alone. A layer with
no partner gets identity factors (round to nearest), optionally after an input-column scaling that
lowers ``||W - W_hat||_F``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor, nn

from .hessians import TargetModule, decoder_layers, weight_matrix

__all__ = ["Partner", "activation_rho", "find_partners", "proxy_factors"]

log = logging.getLogger("yaqa_ext")

# (first, second, kind, first's Gram is the second's H_I), by module name within a block. kind: "head"
# (linear, per attention head group), "gated" (the up branch, scaled by the gate's activation), "gate",
# "mlp" (an activation's derivative between the two).
_PAIRS = [
    ("self_attn.v_proj", "self_attn.o_proj", "head", True),  # Llama, Qwen2, Mistral
    ("self_attn.v_proj", "self_attn.out_proj", "head", True),  # OPT
    ("mlp.up_proj", "mlp.down_proj", "gated", True),  # gated MLPs
    ("mlp.gate_proj", "mlp.down_proj", "gate", False),
    ("fc1", "fc2", "mlp", True),  # OPT
    ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "mlp", True),  # GPT-NeoX
    ("mlp.c_fc", "mlp.c_proj", "mlp", True),  # GPT-2
]


@dataclass(frozen=True)
class Partner:
    role: str  # "first" or "second"
    partner: str  # the module the role pairs with (for a second, the first whose Gram gives H_I)
    kind: str  # "head", "gated", "gate" or "mlp" (see _PAIRS)


def find_partners(model: nn.Module, targets: list[TargetModule]) -> dict[str, Partner]:
    """The pairs of :data:`_PAIRS` present among ``targets`` (modules of other families: none, logged)."""
    prefix, _ = decoder_layers(model)
    names = {t.name: t for t in targets}
    out: dict[str, Partner] = {}
    for i in sorted({t.layer for t in targets}):
        for first, second, kind, feeds in _PAIRS:
            a, b = f"{prefix}.{i}.{first}", f"{prefix}.{i}.{second}"
            if a not in names or b not in names:
                continue
            if kind == "head":
                heads, kv, hd = _heads(model)
                fits = names[a].out_features == kv * hd and names[b].in_features == heads * hd
            else:
                fits = names[a].out_features == names[b].in_features
            if fits:
                out[a] = Partner("first", b, kind)
                if feeds:
                    out[b] = Partner("second", a, kind)
    alone = [n for n in names if n not in out]
    if alone:
        log.info("datafree: %d layers have no partner and get identity factors (e.g. %s)", len(alone), alone[0])
    return out


@lru_cache(maxsize=None)
def activation_rho(name: str, derivative: bool) -> float:
    """``Var[s] / E[s]^2`` of ``s = act(g)`` (or ``act'(g)``), ``g ~ N(0, 1)``, by quadrature."""
    from transformers.activations import ACT2FN

    with torch.enable_grad():  # also under no_grad (quantize)
        g = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64, requires_grad=derivative)
        s = ACT2FN[name](g)
        if derivative:
            (s,) = torch.autograd.grad(s.sum(), g)
    w = torch.exp(-g.detach() ** 2 / 2) * (g[1] - g[0]).detach() / math.sqrt(2 * math.pi)
    mean, second = float((s * w).sum()), float((s * s * w).sum())
    return (second - mean * mean) / (mean * mean)


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


def proxy_factors(model: nn.Module, name: str, partner: Partner | None) -> tuple[Tensor | None, Tensor | None]:
    """``(H_in, H_out)`` of a layer from its partner's current weight (None: identity)."""
    if partner is None:
        return None, None
    W = weight_matrix(model.get_submodule(partner.partner)).double()
    if partner.kind != "head":
        G = W.T @ W if partner.role == "first" else W @ W.T
        if partner.kind == "gate":
            G = torch.diag(G.diagonal())
        else:
            rho = activation_rho(_activation(model), derivative=partner.kind == "mlp")
            G = G + rho * torch.diag(G.diagonal())
        return (None, G) if partner.role == "first" else (G, None)
    heads, kv, hd = _heads(model)
    rep = heads // kv
    if partner.role == "first":  # V, partner O: block g = sum over the query heads h of group g of O_h^T O_h
        O = [W[:, h * hd : (h + 1) * hd] for h in range(heads)]
        return None, torch.block_diag(*[sum(O[h].T @ O[h] for h in range(g * rep, (g + 1) * rep)) for g in range(kv)])
    V = [W[g * hd : (g + 1) * hd] for g in range(kv)]  # O, partner V: block h = V_g V_g^T, g the group of h
    return torch.block_diag(*[V[h // rep] @ V[h // rep].T for h in range(heads)]), None
