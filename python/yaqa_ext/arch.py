"""Model structure, per architecture, in one public registry: the stack of decoder blocks, which modules are
quantization targets and how their weights read as (out, in) matrices (``nn.Linear``, GPT-2's ``Conv1D``, MoE
experts stored as fused 3-D tensors), the matrices kept in float (routers) and the data-free partner pairs.

Collection, quantization, the data-free mode and the Hugging Face loader take structure only from here.
A model family is described by an :class:`Architecture`; :func:`register_architecture` adds or replaces one
(keyed by ``config.model_type``) without editing the package, and every other family gets
:data:`DEFAULT_ARCHITECTURE`.

MoE experts: transformers stores an MoE layer's experts as fused parameters (``gate_up_proj`` of shape
(experts, 2 * intermediate, hidden), ``down_proj``, optional biases; transposed or gate/up interleaved in some
families, as the experts class declares through ``has_bias`` / ``is_transposed``). To quantize
them, :func:`unfuse_experts` replaces such a module by :class:`RoutedExperts`: one :class:`ExpertMLP` of
``nn.Linear`` layers per expert (views of the fused tensors, no copy), the same routed computation, and the
architecture's own gate function. Each expert's matrices are then ordinary targets named
``<experts>.<e>.gate_up_proj`` / ``<experts>.<e>.down_proj``, whose inputs are the tokens routed to the expert.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_ARCHITECTURE",
    "ARCHITECTURES",
    "Architecture",
    "Coverage",
    "ExpertMLP",
    "PartnerRule",
    "RoutedExperts",
    "TargetModule",
    "architecture_of",
    "coverage",
    "decoder_layers",
    "find_targets",
    "fuse_experts",
    "is_fused_experts",
    "linear_shape",
    "register_architecture",
    "replace_module",
    "routed_experts",
    "unfuse_experts",
    "weight_matrix",
]


# ----------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class PartnerRule:
    """Two layers of a block whose product the data-free mode rounds for (see :mod:`yaqa_ext.datafree`), by
    module name within the block. kind: ``"head"`` (linear, per attention head group), ``"gated"`` (the up
    branch of a gated MLP, scaled by the gate's activation), ``"gate"`` (its gate branch) or ``"mlp"`` (an
    activation between the two). feeds: the second's H_I comes from the first. branch: the other branch of a
    gated MLP's first layer (up <-> gate)."""

    first: str
    second: str
    kind: str
    feeds: bool
    branch: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("head", "gated", "gate", "mlp"):
            raise ValueError(f"PartnerRule kind must be 'head', 'gated', 'gate' or 'mlp', got {self.kind!r}")


DEFAULT_PAIRS = (
    PartnerRule("self_attn.v_proj", "self_attn.o_proj", "head", True),  # Llama, Qwen, Mistral, Gemma, MoE families
    PartnerRule("self_attn.v_proj", "self_attn.out_proj", "head", True),  # OPT
    PartnerRule("mlp.up_proj", "mlp.down_proj", "gated", True, "mlp.gate_proj"),  # gated MLPs
    PartnerRule("mlp.gate_proj", "mlp.down_proj", "gate", False, "mlp.up_proj"),
    PartnerRule("fc1", "fc2", "mlp", True),  # OPT
    PartnerRule("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "mlp", True),  # GPT-NeoX
    PartnerRule("mlp.c_fc", "mlp.c_proj", "mlp", True),  # GPT-2
)

DEFAULT_KEEP = {
    r"(^|\.)(gate|router)(\.weight)?$": "MoE router (kept in float: it chooses the experts)",
    r"(^|\.)shared_expert_gate(\.weight)?$": "MoE shared-expert gate (kept in float)",
}
"""Matrices kept in float by default (regular expressions searched in the name within a block -> why)."""


@dataclass(frozen=True)
class Architecture:
    """How yaqa_ext reads one family of models.

    blocks: the attribute path of the decoder blocks (an ``nn.ModuleList``, e.g. ``"model.layers"``); None: the
    outermost ``nn.ModuleList`` whose blocks hold linear layers. keep: regular expressions (searched in a
    matrix's name within its block, e.g. ``"mlp.gate.weight"``) of matrices kept in float, each with the reason
    reported. pairs: the data-free partner pairs. unfuse_experts: MoE experts stored as fused 3-D tensors are
    quantized one matrix per expert (False: they stay in float and are reported as untargeted).
    """

    blocks: str | None = None
    keep: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_KEEP))
    pairs: tuple[PartnerRule, ...] = DEFAULT_PAIRS
    unfuse_experts: bool = True

    def kept(self, name_in_block: str) -> str | None:
        """Why a matrix (its name within a block) stays in float, or None."""
        return next((why for pattern, why in self.keep.items() if re.search(pattern, name_in_block)), None)


DEFAULT_ARCHITECTURE = Architecture()
"""What every model type without an entry of its own gets."""

ARCHITECTURES: dict[str, Architecture] = {}
"""Registered architectures by ``config.model_type``."""


def register_architecture(model_type: str, arch: Architecture, replace: bool = False) -> Architecture:
    """Describe the models of ``config.model_type == model_type`` by ``arch`` (``replace``: over an existing entry)."""
    if not isinstance(arch, Architecture):
        raise TypeError(f"arch must be a yaqa_ext.arch.Architecture, got {type(arch).__name__}")
    if model_type in ARCHITECTURES and not replace and ARCHITECTURES[model_type] != arch:
        raise ValueError(f"an architecture for model_type {model_type!r} is registered already; pass replace=True")
    ARCHITECTURES[model_type] = arch
    return arch


def architecture_of(model: nn.Module) -> Architecture:
    """The registered architecture of ``model.config.model_type``, else :data:`DEFAULT_ARCHITECTURE`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return ARCHITECTURES.get(model_type, DEFAULT_ARCHITECTURE)


# ----------------------------------------------------------------------------------------------
# Linear layers and decoder blocks


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out_features, in_features) of an nn.Linear or a GPT-2 style Conv1D (weight stored in x out); None else."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return module.nf, module.nx
    return None


def weight_matrix(module: nn.Module) -> Tensor:
    """The (out, in) weight of a linear layer: nn.Linear, GPT-2's Conv1D (stored in x out), QuantizedLinear."""
    W = module.weight.detach()
    return W.T if type(module).__name__ == "Conv1D" else W


def _holds_linear(module: nn.Module) -> bool:
    return any(linear_shape(m) is not None or is_fused_experts(m) for m in module.modules())


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks: the architecture's ``blocks`` path, else the outermost
    ``nn.ModuleList`` (not inside another one) with the most blocks holding linear layers (in one block at
    least: the lower ones may be quantized already)."""
    path = architecture_of(model).blocks
    if path is not None:
        blocks = model.get_submodule(path)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"the architecture's blocks {path!r} is a {type(blocks).__name__}, not an nn.ModuleList")
        return path, blocks
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    outer = [(n, m) for n, m in lists if not any(n.startswith(f"{o}.") for o, _ in lists)]
    candidates = [(n, m) for n, m in outer if _holds_linear(m)]
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no supported linear layer (nn.Linear, Conv1D or fused MoE experts) inside a "
            "list of decoder blocks (an nn.ModuleList); describe its blocks with yaqa_ext.arch.register_architecture"
        )
    return max(candidates, key=lambda c: len(c[1]))


@dataclass(frozen=True)
class TargetModule:
    """A quantization target: a linear layer inside decoder block ``layer``. For one expert's matrix of an MoE
    layer, ``experts`` is the :class:`RoutedExperts` module that routes tokens to it and ``expert`` its index."""

    name: str
    layer: int
    module: nn.Module
    out_features: int
    in_features: int
    experts: RoutedExperts | None = None
    expert: int | None = None

    @property
    def pooled_names(self) -> list[str]:
        """The same matrix of every expert of the layer (the target itself when it is not an expert's)."""
        if self.experts is None:
            return [self.name]
        head, _, proj = self.name.rpartition(f".{self.expert}.")
        return [f"{head}.{e}.{proj}" for e in range(len(self.experts))]


def _block_targets(prefix: str, index: int, block: nn.Module, arch: Architecture) -> Iterator[TargetModule]:
    """Every linear layer of one block not kept in float by ``arch``."""
    routers = {}
    for sub, module in block.named_modules():
        if isinstance(module, RoutedExperts):
            routers.update({f"{sub}.{e}.": (module, e) for e in range(len(module))})
        shape = linear_shape(module)
        if shape is None or arch.kept(f"{sub}.weight") is not None:
            continue
        experts, expert = next((r for p, r in routers.items() if sub.startswith(p)), (None, None))
        yield TargetModule(f"{prefix}.{index}.{sub}", index, module, *shape, experts, expert)


def find_targets(
    model: nn.Module, layers: list[int] | None = None, include: str | None = None, exclude: str | None = None
) -> list[TargetModule]:
    """The linear layers inside the decoder blocks (lm_head and embeddings are outside them), less those the
    architecture keeps in float (routers); fused MoE experts count once unfused (:func:`unfuse_experts`).

    ``layers`` selects decoder blocks by index; ``include`` / ``exclude`` are regular expressions
    matched (``re.search``) against full module names.
    """
    prefix, blocks = decoder_layers(model)
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {len(blocks)} decoder layers (0..{len(blocks) - 1})")
    arch = architecture_of(model)
    targets = [t for i, block in enumerate(blocks) if layers is None or i in layers
               for t in _block_targets(prefix, i, block, arch)
               if not (include and not re.search(include, t.name)) and not (exclude and re.search(exclude, t.name))]
    if not targets:
        raise ValueError("no linear layer selected: check layers=, include= and exclude=")
    return targets


# ----------------------------------------------------------------------------------------------
# Coverage


@dataclass(frozen=True)
class Coverage:
    """How much of the decoder blocks' matrices (parameters of 2 or more dimensions) the targets cover."""

    targeted: int
    """Weights (entries) in targeted matrices."""
    total: int
    """Weights in all matrices of the decoder blocks."""
    untargeted: dict[str, str]
    """Each matrix left in float (full parameter name) -> why."""

    @property
    def fraction(self) -> float:
        return self.targeted / max(self.total, 1)

    def summary(self) -> str:
        """One line: the fraction covered, and what is not (and why), saying so when it is below 90%."""
        line = f"targets cover {100 * self.fraction:.1f}% of the decoder weights"
        if self.untargeted:
            reasons: dict[str, int] = {}
            for why in self.untargeted.values():
                reasons[why] = reasons.get(why, 0) + 1
            line += "; left in float: " + "; ".join(f"{n} x {why}" for why, n in reasons.items())
        if self.fraction < 0.9:
            line += " (LESS THAN 90%: most of the model stays in float)"
        return line


def coverage(model: nn.Module, targets: list[TargetModule], left: Mapping[str, str] | None = None) -> Coverage:
    """The matrices of the decoder blocks that ``targets`` cover; the others with why: ``left`` (module name ->
    why the caller left it, e.g. the user's skip list), kept by the architecture (routers), or not a supported
    linear layer (with its class)."""
    prefix, blocks = decoder_layers(model)
    arch = architecture_of(model)
    chosen = {t.name for t in targets}
    left = left or {}
    targeted = total = 0
    untargeted: dict[str, str] = {}
    for i, block in enumerate(blocks):
        for sub, module in block.named_modules():
            name = f"{prefix}.{i}.{sub}" if sub else f"{prefix}.{i}"
            for key, p in module.named_parameters(recurse=False):
                if p.dim() < 2:
                    continue
                total += p.numel()
                if name in chosen and key == "weight":
                    targeted += p.numel()
                elif name in left:
                    untargeted[f"{name}.{key}"] = left[name]
                else:
                    why = arch.kept(f"{sub}.{key}")
                    untargeted[f"{name}.{key}"] = why or _unsupported(module, key)
    return Coverage(targeted, total, untargeted)


def _unsupported(module: nn.Module, key: str) -> str:
    if is_fused_experts(module):
        return "fused MoE experts the architecture does not unfuse"
    if linear_shape(module) is not None:
        return "not selected (layers= / include= / exclude=)"
    return f"not a supported linear layer ({type(module).__name__}.{key})"


# ----------------------------------------------------------------------------------------------
# MoE experts


def _fused(module: nn.Module, key: str) -> bool:
    return isinstance(getattr(module, key, None), nn.Parameter) and getattr(module, key).dim() == 3


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers MoE experts module with fused 3-D weights (the standard experts
    interface since transformers 5.0: ``num_experts``, ``_apply_gate`` over a 3-D ``gate_up_proj``, or
    ``act_fn`` over ``up_proj``, then ``down_proj``)."""
    if not isinstance(getattr(module, "num_experts", None), int) or not _fused(module, "down_proj"):
        return False
    return (_fused(module, "gate_up_proj") and hasattr(module, "_apply_gate")) or (
        _fused(module, "up_proj") and hasattr(module, "act_fn"))


def _expert_linear(weight: Tensor, bias: Tensor | None, transposed: bool) -> nn.Linear:
    """An nn.Linear whose weight (and bias) are views of one expert's slice of the fused tensors."""
    W = (weight.T if transposed else weight).detach()
    linear = nn.Linear(W.size(1), W.size(0), bias=bias is not None, device="meta", dtype=W.dtype)
    linear.weight = nn.Parameter(W, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


def _without_weights(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` without its parameters (its own dicts of submodules, buffers and hooks)."""
    copy = object.__new__(type(module))
    copy.__dict__.update({k: type(v)(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()})
    copy._parameters = {}
    return copy


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(gate(gate_up_proj(x)))`` (or ``down_proj(act(up_proj(x)))`` without a gate)."""

    def __init__(self, first_name: str, first: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.first_name = first_name
        self.add_module(first_name, first)
        self.down_proj = down_proj

    @property
    def first(self) -> nn.Module:
        return getattr(self, self.first_name)


class RoutedExperts(nn.ModuleList):
    """An MoE layer's experts as one :class:`ExpertMLP` each (children ``0 .. E-1``), computing what the fused
    module computes: each token's output is ``sum_k w_k expert_{i_k}(x)`` over its routed experts. The
    architecture's module (without its weights) is kept for its gate function (``_apply_gate``, e.g. gpt-oss's
    clamped GLU), its attributes and to rebuild it (:meth:`fused`).

    ``current_rows``: while an expert runs, the indices (ascending) of the tokens routed to it among the
    ``current_tokens`` rows of the layer's ``(tokens, hidden)`` input; :mod:`yaqa_ext.hessians` reads them to
    give each expert's factors their tokens.
    """

    def __init__(self, experts: list[ExpertMLP], shell: nn.Module) -> None:
        super().__init__(experts)
        object.__setattr__(self, "shell", shell)  # not a submodule: no weights, no state-dict keys
        self.current_rows: Tensor | None = None
        self.current_tokens = 0

    @classmethod
    def from_fused(cls, module: nn.Module) -> RoutedExperts:
        """The routed form of a fused experts module; its linears view the fused tensors (no copy)."""
        if not is_fused_experts(module):
            raise TypeError(f"{type(module).__name__} is not a fused MoE experts module (see is_fused_experts)")
        first = "gate_up_proj" if _fused(module, "gate_up_proj") else "up_proj"
        transposed, has_bias = bool(getattr(module, "is_transposed", False)), bool(getattr(module, "has_bias", False))
        params = dict(module.named_parameters(recurse=False))
        experts = [
            ExpertMLP(first,
                      _expert_linear(params[first][e], params[f"{first}_bias"][e] if has_bias else None, transposed),
                      _expert_linear(params["down_proj"][e], params["down_proj_bias"][e] if has_bias else None, transposed))
            for e in range(module.num_experts)
        ]
        return cls(experts, _without_weights(module))

    def fused(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The architecture's own experts module holding these experts' current weights (effective weights of
        quantized ones) stacked into its fused tensors, in ``dtype`` (default: the first expert's weight's)."""
        shell, first = self.shell, self[0].first_name
        module = _without_weights(shell)
        transposed = bool(getattr(shell, "is_transposed", False))
        dtype = dtype or self[0].first.weight.dtype
        for key, get in ((first, lambda x: x.first), ("down_proj", lambda x: x.down_proj)):
            W = torch.stack([weight_matrix(get(x)).T if transposed else weight_matrix(get(x)) for x in self])
            module.register_parameter(key, nn.Parameter(W.detach().to(dtype), requires_grad=False))
            if getattr(get(self[0]), "bias", None) is not None:
                b = torch.stack([get(x).bias.detach() for x in self])
                module.register_parameter(f"{key}_bias", nn.Parameter(b.to(dtype), requires_grad=False))
        return module

    @property
    def gated(self) -> bool:
        """Whether each expert's first matrix is a fused [gate; up] (else an up projection and an activation)."""
        return self[0].first_name == "gate_up_proj"

    def gate_up_halves(self) -> tuple[slice, slice]:
        """The rows of the gate and of the up projection within each expert's fused ``gate_up_proj``: the first and
        second halves, or the even and odd rows where the experts class declares them interleaved
        (``is_concatenated=False``, gpt-oss; releases of transformers without the flag get halves)."""
        if getattr(self.shell, "is_concatenated", True):
            size = self[0].down_proj.in_features
            return slice(0, size), slice(size, 2 * size)
        return slice(0, None, 2), slice(1, None, 2)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """``(tokens, hidden)`` -> ``(tokens, hidden)``; experts indices ``(tokens, k)`` and their weights."""
        out = torch.zeros_like(hidden_states)
        k = top_k_index.size(-1)
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # by expert, then by token
        counts = torch.bincount(flat, minlength=len(self) + 1)[: len(self)].tolist()
        weights = top_k_weights.reshape(-1)[order]
        start, self.current_tokens = 0, hidden_states.size(0)
        for e, count in enumerate(counts):
            if count == 0:
                continue
            picked = order[start : start + count]
            rows = picked // k
            self.current_rows = rows
            try:
                y = self._expert(self[e], hidden_states[rows])
            finally:
                self.current_rows = None
            out.index_add_(0, rows, (y * weights[start : start + count, None]).to(out.dtype))
            start += count
        return out

    def _expert(self, expert: ExpertMLP, x: Tensor) -> Tensor:
        h = expert.first(x)
        h = self.shell._apply_gate(h) if self.gated else self.shell.act_fn(h)
        return expert.down_proj(h)


def unfuse_experts(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace fused experts modules by their :class:`RoutedExperts`, in place: ``names`` (full module names), or
    every one of the decoder blocks when the architecture unfuses experts; the names of the modules replaced."""
    if names is None:
        if not architecture_of(model).unfuse_experts:
            return []
        prefix, blocks = decoder_layers(model)
        names = [f"{prefix}.{i}.{sub}" for i, block in enumerate(blocks) for sub, module in block.named_modules()
                 if is_fused_experts(module)]
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, RoutedExperts):
            continue
        if not is_fused_experts(module):
            raise ValueError(f"{name} is a {type(module).__name__}, not fused MoE experts: the saved config does not fit "
                             "this model (quantize it again)")
        if any(hasattr(p, "to_local") for p in module.parameters()):
            raise ValueError(f"{name}: its experts are sharded (FSDP2 DTensors); unfuse them first, then shard: "
                             "yaqa_ext.arch.unfuse_experts(model) before fully_shard")
        replace_module(model, name, RoutedExperts.from_fused(module))
    return list(names)


def fuse_experts(model: nn.Module, dtype: torch.dtype | None = None, names: list[str] | None = None) -> list[str]:
    """Undo :func:`unfuse_experts`: each :class:`RoutedExperts` (``names``, default all) back to the architecture's
    module, with its current weights in ``dtype`` (see :meth:`RoutedExperts.fused`), in place; the names replaced."""
    if names is None:
        names = [n for n, m in model.named_modules() if isinstance(m, RoutedExperts)]
    for name in names:
        replace_module(model, name, model.get_submodule(name).fused(dtype))
    return names


@contextmanager
def routed_experts(model: nn.Module) -> Iterator[list[str]]:
    """:func:`unfuse_experts` for the duration of the block, then the original modules (and tensors) back."""
    originals = {n: m for n, m in model.named_modules() if is_fused_experts(m)}
    names = unfuse_experts(model)
    try:
        yield names
    finally:
        for name in names:
            replace_module(model, name, originals[name])


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``name`` of ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
