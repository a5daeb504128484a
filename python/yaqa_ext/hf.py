"""Hugging Face integration: the ``quantization_config`` of yaqa models and the ``HfQuantizer`` that lets
``AutoModelForCausalLM.from_pretrained`` rebuild them (registered when ``yaqa_ext`` is imported)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .codebooks import CODEBOOKS, Codebook, get_codebook
from .fileio import atomic_save, atomic_write_text
from .lowrank import LOWRANK_METHODS
from .methods import get_method
from .qlinear import QuantizedLinear

__all__ = ["QuantConfig", "YaqaHfQuantizer", "dequantize", "export_lora", "replace_module"]


@dataclass
class QuantConfig(QuantizationConfigMixin):
    """How to quantize; saved as ``quantization_config`` (``quant_method: "yaqa"``) in config.json.

    method: a name in :data:`yaqa_ext.methods.METHODS`: ``"yaqa"`` (two-sided LDLQ with H_in and H_out),
    ``"ldlq"`` (one-sided with H_in, = GPTQ), ``"rtn"`` (round to nearest, no data) or ``"datafree"`` (no
    data: proxy factors from partner layers' weights, see :mod:`yaqa_ext.datafree`; ``datafree_transform``
    adds the input-column scaling search for layers without a partner). bits: 2, 3, 4 or 8. quantizer: the codebook, a name in
    :data:`yaqa_ext.codebooks.CODEBOOKS` (``"int"``: the scalar INT grid, :class:`yaqa_ext.IntCodebook`).
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
    with input moments, else ``svd``).
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
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Filled by quantize(): per quantized module, the shape of its QuantizedLinear."""
    quant_method: str = "yaqa"

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
        self.quant_method = "yaqa"

    def make_quantizer(self) -> Codebook:
        """The codebook this config asks for."""
        return get_codebook(self.quantizer).from_config(self)

    def skips(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.skip)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        known = {k: v for k, v in {**config_dict, **kwargs}.items() if k in cls.__dataclass_fields__}
        config = cls(**known)
        return (config, {}) if return_unused_kwargs else config

    def summary(self) -> str:
        scale = f"group {self.group_size}" if self.group_size else f"{self.scale} scale"
        lowrank = f", + rank {self.lowrank_rank} {self.lowrank_method}" if self.lowrank_rank else ""
        return f"{self.method} {self.bits}-bit {self.quantizer}, {scale}{', RHT' if self.rht else ''}{lowrank}"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def dequantize(model: nn.Module, lowrank: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every :class:`QuantizedLinear` by an ``nn.Linear`` holding its effective weight, in place
    (``lowrank=False``: without the low-rank term, the base of a QLoRA-style adapter from
    :func:`export_lora`), in ``dtype`` (default: the model's, ``model.dtype``, so a bf16 model stays bf16).
    The model no longer carries a ``quantization_config``."""
    if dtype is None:
        dtype = getattr(model, "dtype", None) or torch.float32
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=module.qweight.device, dtype=dtype)
            linear.weight.data.copy_(module.weight_matrix(lowrank=lowrank))
            if module.bias is not None:
                linear.bias.data.copy_(module.bias)
            replace_module(model, name, linear)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return model


def export_lora(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write the low-rank terms of a quantized model as a PEFT LoRA adapter (``adapter_config.json``,
    ``adapter_model.safetensors``): ``lora_B = A``, ``lora_A = B``, ``alpha = r`` (scaling 1). Load it with
    ``peft.PeftModel.from_pretrained(base, out_dir)`` on ``dequantize(copy, lowrank=False)`` of the model:
    the QLoRA-style initialisation of QERA."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and m.lowrank_A is not None}
    if not layers:
        raise ValueError("no layer has a low-rank term: quantize with QuantConfig(lowrank_rank=k) first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, ranks = {}, {}
    for name, m in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lowrank_B.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.lowrank_A.detach().cpu().contiguous()
        ranks[name] = m.lowrank_A.size(1)
    r = max(ranks.values())
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(layers), "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: k for n, k in ranks.items() if k != r}, "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": str(getattr(model, "name_or_path", "") or ""),
    }
    atomic_save(tensors, out / "adapter_model.safetensors")
    atomic_write_text(json.dumps(config, indent=2), out / "adapter_config.json")
    return out


def _not_loaded(module: nn.Module) -> list[str]:
    """The module's buffers that transformers did not read from the files (it flags each tensor it loads
    with ``_is_hf_initialized`` and fills the others with uninitialised memory)."""
    return [k for k, b in module.named_buffers(recurse=False) if not getattr(b, "_is_hf_initialized", False)]


class YaqaHfQuantizer(HfQuantizer):
    """Loads models saved after :func:`yaqa_ext.quantize`: swaps each quantized module for an empty
    :class:`QuantizedLinear` of the recorded shape before the weights are read."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        for name, spec in self.quantization_config.modules.items():
            replace_module(model, name, QuantizedLinear.from_spec(spec))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, spec in self.quantization_config.modules.items():
            module = model.get_submodule(name)
            module.check_buffers(name, spec, _not_loaded(module))
            module.process_weights_after_loading()
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        return dequantize(model, dtype=dtype)

    @property
    def is_trainable(self) -> bool:
        return False


# Registered once (a re-import must not trip transformers' "already registered" check).
if "yaqa" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config("yaqa")(QuantConfig)
if "yaqa" not in AUTO_QUANTIZER_MAPPING:
    register_quantizer("yaqa")(YaqaHfQuantizer)
