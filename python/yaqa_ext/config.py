"""What to quantize and how: :class:`QuantConfig`, a plain dataclass the library, the pipeline and the CLI share
(no Hugging Face types; :mod:`yaqa_ext.hf` adapts it to transformers)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .codebooks import CODEBOOKS, Codebook, get_codebook
from .lowrank import LOWRANK_METHODS
from .methods import get_method

__all__ = ["EXPERT_FALLBACKS", "QuantConfig"]

EXPERT_FALLBACKS = ("shared", "rtn")
"""What an MoE expert that saw too few calibration tokens is rounded with (see QuantConfig)."""


@dataclass
class QuantConfig:
    """How to quantize (a plain dataclass; :class:`yaqa_ext.hf.YaqaHfConfig` is its Hugging Face form, saved as
    ``quantization_config`` with ``quant_method: "yaqa"`` in config.json).

    method: a name in :data:`yaqa_ext.methods.METHODS`: ``"yaqa"`` (two-sided LDLQ with H_in and H_out),
    ``"ldlq"`` (one-sided with H_in, = GPTQ), ``"rtn"`` (round to nearest, no data) or ``"datafree"`` (no
    data: proxy factors from partner layers' weights, see :mod:`yaqa_ext.datafree`; ``datafree_transform``
    adds the input-column scaling search for layers without a partner). bits: 2, 3, 4 or 8. quantizer: the codebook, a name in
    :data:`yaqa_ext.codebooks.CODEBOOKS` (``"int"``: the scalar INT grid, :class:`yaqa_ext.IntCodebook`; ``"e8p"``:
    the E8P lattice, 2-4 bits, :class:`yaqa_ext.codebooks.E8PCodebook`; ``"trellis"``: bitshift trellis codes, 1-4
    bits, :class:`yaqa_ext.codebooks.TrellisCodebook`).
    scale: ``"channel"`` (one scale per output row) or ``"tensor"``; group_size: None, or the number of
    input columns per scale (GPTQ-style groups, overrides ``scale``). Scales are searched for the
    least rounding error (see :class:`IntCodebook`). rht: random Hadamard transform of weights and factors. sigma_reg:
    relative damping of the normalised factors (retried with more if a factor is indefinite).
    td_x / td_y: tile rows / columns (the largest divisor of the layer's size at most this). Small
    tiles feed the rounding error back more finely; with scalar grids 2 x 2 gave clearly lower KL
    than 16 x 16 (benchmarks/results/quality.md). Vector codebooks want tiles of their dimension.
    skip: regular expressions of module names to leave unquantized. lowrank_rank / lowrank_method:
    a rank-k term ``A B`` (fp16) added to each layer after rounding, by one of
    :data:`yaqa_ext.lowrank.LOWRANK_METHODS` (``"auto"``: ``kl`` with both factors, else ``qera-exact``
    with input moments, else ``svd``). finetune_epochs / finetune_lr: per-block fine-tuning during quantization
    (:mod:`yaqa_ext.finetune`; needs calibration data, 0 epochs: off), Adam's learning rate. finetune_e2e_epochs:
    then the whole quantized model's float parameters and channel scales trained against the original's
    output distribution (KL), at the same learning rate (a copy of the original is held meanwhile).
    rounding_scale_search: adaptive rounding is run with the grid's scales times each factor of
    ``ROUNDING_SCALES`` and keeps the result of least proxy loss (the scale that suits round-to-nearest is
    not the best once errors are fed back; about 5x the rounding time).
    expert_min_tokens / expert_fallback: an MoE expert's matrix whose collection saw fewer routed tokens than
    ``expert_min_tokens`` is rounded with ``"shared"`` factors (the sum of that matrix's factors over all experts
    of its layer) or round to nearest (``"rtn"``); the report lists each one.
    """

    method: str = "yaqa"
    bits: int = 2
    quantizer: str = "int"
    symmetric: bool = True
    scale: str = "channel"
    group_size: int | None = None
    rht: bool = True
    sigma_reg: float = 1e-2
    td_x: int = 2
    td_y: int = 2
    seed: int = 0
    skip: list[str] = field(default_factory=list)
    lowrank_rank: int = 0
    lowrank_method: str = "auto"
    datafree_transform: bool = False
    finetune_epochs: int = 0
    finetune_lr: float = 1e-3
    finetune_e2e_epochs: int = 0
    rounding_scale_search: bool = False
    expert_min_tokens: int = 16
    expert_fallback: str = "shared"
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Filled by quantize() (in a copy): per quantized module, the spec of its QuantizedLinear."""
    routed_experts: list[str] = field(default_factory=list)
    """Filled by quantize() (in a copy): the MoE experts modules stored one linear per expert
    (:class:`yaqa_ext.arch.RoutedExperts`), which a loader unfuses before reading the weights."""

    def __post_init__(self) -> None:
        get_method(self.method)
        if self.quantizer not in CODEBOOKS:
            raise ValueError(f"quantizer must be a registered codebook, one of {sorted(CODEBOOKS)}, got {self.quantizer!r}")
        if self.scale not in ("channel", "tensor"):
            raise ValueError(f"scale must be 'channel' or 'tensor', got {self.scale!r}")
        self.make_quantizer()  # validates bits and group_size
        if self.sigma_reg < 0:
            raise ValueError(f"sigma_reg must be >= 0, got {self.sigma_reg}")
        if self.td_x < 1 or self.td_y < 1 or self.td_x * self.td_y > 1024:
            raise ValueError(f"td_x ({self.td_x}) and td_y ({self.td_y}) must be >= 1 with td_x * td_y <= 1024")
        for pattern in self.skip:
            re.compile(pattern)
        if self.lowrank_rank < 0:
            raise ValueError(f"lowrank_rank must be >= 0, got {self.lowrank_rank}")
        if self.lowrank_method not in ("auto", *LOWRANK_METHODS):
            raise ValueError(f"lowrank_method must be 'auto' or one of {LOWRANK_METHODS}, got {self.lowrank_method!r}")
        if self.finetune_epochs < 0 or self.finetune_e2e_epochs < 0:
            raise ValueError(f"finetune_epochs ({self.finetune_epochs}) and finetune_e2e_epochs "
                             f"({self.finetune_e2e_epochs}) must be >= 0 (0: no fine-tuning)")
        if not self.finetune_lr > 0:
            raise ValueError(f"finetune_lr must be > 0, got {self.finetune_lr}")
        if self.expert_min_tokens < 0:
            raise ValueError(f"expert_min_tokens must be >= 0 (0: every expert uses its own factors), got {self.expert_min_tokens}")
        if self.expert_fallback not in EXPERT_FALLBACKS:
            raise ValueError(f"expert_fallback must be one of {EXPERT_FALLBACKS}, got {self.expert_fallback!r}")

    def make_quantizer(self) -> Codebook:
        """The codebook this config asks for."""
        return get_codebook(self.quantizer).from_config(self)

    def skips(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.skip)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> QuantConfig:
        """The config of a dict of its fields, ``modules`` either per module or grouped (:func:`group_specs`);
        other keys (``quant_method`` of a saved config) are ignored."""
        fields = {k: v for k, v in config_dict.items() if k in cls.__dataclass_fields__}
        if isinstance(fields.get("modules"), list):
            fields["modules"] = ungroup_specs(fields["modules"])
        return cls(**fields)

    def summary(self) -> str:
        scale = f"group {self.group_size}" if self.group_size else f"{self.scale} scale"
        lowrank = f", + rank {self.lowrank_rank} {self.lowrank_method}" if self.lowrank_rank else ""
        finetune = f", fine-tuned {self.finetune_epochs} epochs" if self.finetune_epochs else ""
        finetune += f", end-to-end KL {self.finetune_e2e_epochs} epochs" if self.finetune_e2e_epochs else ""
        return f"{self.method} {self.bits}-bit {self.quantizer}, {scale}{', RHT' if self.rht else ''}{lowrank}{finetune}"


def group_specs(modules: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-module layer specs as groups of one shared spec and each member's ``rht_seed`` (the one field every
    layer draws for itself): a few groups per architecture instead of one spec per module in config.json."""
    groups: dict[str, dict[str, Any]] = {}
    for name, spec in modules.items():
        shared = {k: v for k, v in spec.items() if k != "rht_seed"}
        group = groups.setdefault(json.dumps(shared, sort_keys=True), {"spec": shared, "rht_seeds": {}})
        group["rht_seeds"][name] = spec.get("rht_seed", 0)
    return list(groups.values())


def ungroup_specs(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The per-module specs of :func:`group_specs`' groups."""
    try:
        return {name: {**g["spec"], "rht_seed": seed} for g in groups for name, seed in g["rht_seeds"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError("quantization_config.modules: each group needs a 'spec' object and an 'rht_seeds' object "
                         f"(module name: seed); the saved config is damaged ({e!r}): quantize again") from None
