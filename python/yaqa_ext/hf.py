"""Hugging Face integration: the ``quantization_config`` of yaqa models and the ``HfQuantizer`` that lets
``AutoModelForCausalLM.from_pretrained`` rebuild them (registered when ``yaqa_ext`` is imported)."""

from __future__ import annotations

import json
import os
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

from .config import QuantConfig
from .fileio import atomic_save, atomic_write_text
from .qlinear import QuantizedLinear

__all__ = ["YaqaHfConfig", "YaqaHfQuantizer", "dequantize", "export_lora", "replace_module"]


class YaqaHfConfig(QuantizationConfigMixin):
    """transformers' form of a :class:`QuantConfig`: its fields as attributes plus ``quant_method = "yaqa"``, what
    ``config.json`` holds and ``from_pretrained`` reads back (validated through QuantConfig)."""

    def __init__(self, **fields: Any) -> None:
        self.quant_method = "yaqa"
        self.__dict__.update(QuantConfig.from_dict(fields).to_dict())

    @classmethod
    def of(cls, config: QuantConfig) -> YaqaHfConfig:
        return cls(**config.to_dict())

    def quant_config(self) -> QuantConfig:
        """The plain config."""
        return QuantConfig.from_dict(self.to_dict())


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
    :class:`QuantizedLinear` of the recorded shape before the weights are read. Given a config for a model
    that is not quantized (``from_pretrained(path, quantization_config=YaqaHfConfig(method="rtn", bits=4))``),
    it quantizes on load with the methods that need no calibration data."""

    requires_calibration = False  # checked per method in validate_environment

    def validate_environment(self, *args, **kwargs):
        if self.pre_quantized:
            return
        from .methods import get_method

        from .lowrank import INPUT_STAT_METHODS

        config = self.quantization_config.quant_config()
        wants = [what for what, needed in (
            (f"method {config.method!r}", get_method(config.method).needs_data),
            ("fine-tuning", config.finetune_epochs > 0 or config.finetune_e2e_epochs > 0),
            (f"lowrank_method {config.lowrank_method!r}",
             config.lowrank_rank > 0 and config.lowrank_method in (*INPUT_STAT_METHODS, "kl"))) if needed]
        if wants:
            raise ValueError(
                f"quantize on load: {' and '.join(wants)} {'needs' if len(wants) == 1 else 'need'} calibration data, which from_pretrained does not have; "
                "load the model, then call yaqa_ext.quantize(model, config, data=...) (on load: method 'rtn' or "
                "'datafree', without fine-tuning, low-rank terms 'svd' or 'auto')")

    def _process_model_before_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            for name, spec in self.quantization_config.modules.items():
                replace_module(model, name, QuantizedLinear.from_spec(spec))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            from .quantize import quantize

            quantize(model, self.quantization_config.quant_config(), progress=False)
            self.quantization_config = model.config.quantization_config  # the filled copy, with each layer's spec
            return model
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
    register_quantization_config("yaqa")(YaqaHfConfig)
if "yaqa" not in AUTO_QUANTIZER_MAPPING:
    register_quantizer("yaqa")(YaqaHfQuantizer)
