"""Hugging Face integration: the ``quantization_config`` of yaqa models and the ``HfQuantizer`` that lets
``AutoModelForCausalLM.from_pretrained`` rebuild them (registered when ``yaqa_ext`` is imported)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .codebooks import IntQuantizer, Quantizer
from .qlinear import QuantizedLinear

__all__ = ["METHODS", "QuantConfig", "YaqaHfQuantizer", "replace_module"]

METHODS = ("yaqa", "ldlq", "rtn")


@dataclass
class QuantConfig(QuantizationConfigMixin):
    """How to quantize; saved as ``quantization_config`` (``quant_method: "yaqa"``) in config.json.

    method: ``"yaqa"`` (two-sided LDLQ with H_in and H_out), ``"ldlq"`` (one-sided with H_in, = GPTQ),
    or ``"rtn"`` (round to nearest, no data). bits: 2, 3, 4 or 8. quantizer: ``"int"`` (scalar grid).
    scale: ``"channel"`` (one scale per output row) or ``"tensor"``; group_size: None, or the number of
    input columns per scale (GPTQ-style groups, overrides ``scale``). Scales are searched for the
    least rounding error (see :class:`IntQuantizer`). rht: random Hadamard transform of weights and factors. sigma_reg:
    relative damping of the normalised factors (retried with more if a factor is indefinite).
    td_x / td_y: tile rows / columns (the largest divisor of the layer's size at most this).
    skip: regular expressions of module names to leave unquantized.
    """

    method: str = "yaqa"
    bits: int = 2
    quantizer: str = "int"
    symmetric: bool = True
    scale: str = "channel"
    group_size: int | None = None
    rht: bool = True
    sigma_reg: float = 1e-2
    td_x: int = 16
    td_y: int = 16
    seed: int = 0
    skip: list[str] = field(default_factory=list)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Filled by quantize(): per quantized module, the shape of its QuantizedLinear."""
    quant_method: str = "yaqa"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.quantizer != "int":
            raise ValueError(f"quantizer must be 'int' (the scalar INT-k grid), got {self.quantizer!r}")
        if self.scale not in ("channel", "tensor"):
            raise ValueError(f"scale must be 'channel' or 'tensor', got {self.scale!r}")
        self.make_quantizer()  # validates bits and group_size
        if self.sigma_reg < 0:
            raise ValueError(f"sigma_reg must be >= 0, got {self.sigma_reg}")
        if self.td_x < 1 or self.td_y < 1 or self.td_x * self.td_y > 1024:
            raise ValueError(f"td_x ({self.td_x}) and td_y ({self.td_y}) must be >= 1 with td_x * td_y <= 1024")
        for pattern in self.skip:
            re.compile(pattern)
        self.quant_method = "yaqa"

    def make_quantizer(self) -> Quantizer:
        if self.group_size is not None:
            return IntQuantizer(self.bits, self.symmetric, "group", self.group_size)
        return IntQuantizer(self.bits, self.symmetric, self.scale)

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
        return f"{self.method} {self.bits}-bit {self.quantizer}, {scale}{', RHT' if self.rht else ''}"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class YaqaHfQuantizer(HfQuantizer):
    """Loads models saved after :func:`yaqa_ext.quantize`: swaps each quantized module for an empty
    :class:`QuantizedLinear` of the recorded shape before the weights are read."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        for name, spec in self.quantization_config.modules.items():
            replace_module(model, name, QuantizedLinear(**spec))
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


# Registered once (a re-import must not trip transformers' "already registered" check).
if "yaqa" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config("yaqa")(QuantConfig)
if "yaqa" not in AUTO_QUANTIZER_MAPPING:
    register_quantizer("yaqa")(YaqaHfQuantizer)
