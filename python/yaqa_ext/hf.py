"""Hugging Face integration: the ``quantization_config`` of yaqa models, the ``HfQuantizer`` that lets
``AutoModelForCausalLM.from_pretrained`` rebuild them, and the saved ``config.json`` form that transformers refuses
to load without yaqa_ext (all registered when ``yaqa_ext`` is imported)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .arch import RoutedExperts, fuse_experts, replace_module, unfuse_experts
from .config import QuantConfig, group_specs
from .fileio import atomic_save, atomic_write_text
from .qlinear import QuantizedLinear

__all__ = ["YaqaHfConfig", "YaqaHfQuantizer", "YaqaSavedConfig", "dequantize", "export_lora", "mark_quantized",
           "unmark_quantized"]

SAVED_MODEL_TYPE = "yaqa_ext"
CONFIG_FORMAT_VERSION = 3
"""The newest quantization_config layout this yaqa_ext reads: 1 (or no format_version) one spec per module, 2 the
specs grouped, 3 also MoE experts stored one matrix per expert (``routed_experts``; written only then, so older
yaqa_ext versions refuse those folders with their upgrade message). Each spec carries its codebook's own
format_version."""
LOADER_MODULE = "configuration_yaqa_ext"
_LOADER_SOURCE = '''"""The loader of this yaqa_ext-quantized model: its layers need the yaqa_ext package (pip install yaqa_ext).

transformers runs this file with trust_remote_code=True when yaqa_ext has not been imported; it imports yaqa_ext,
whose config class reads config.json and whose quantizer rebuilds the quantized layers.
"""
from yaqa_ext.hf import YaqaSavedConfig  # noqa: F401
'''


class YaqaHfConfig(QuantizationConfigMixin):
    """transformers' form of a :class:`QuantConfig`: its fields as attributes plus ``quant_method = "yaqa"``, what
    ``config.json`` holds and ``from_pretrained`` reads back (validated through QuantConfig)."""

    def __init__(self, **fields: Any) -> None:
        version = fields.get("format_version", 1)
        if not isinstance(version, int) or not 1 <= version <= CONFIG_FORMAT_VERSION:
            raise ValueError(f"quantization_config has format_version {version!r}; this yaqa_ext reads versions 1 to "
                             f"{CONFIG_FORMAT_VERSION}: upgrade yaqa_ext (pip install -U yaqa_ext) to load it")
        self.quant_method = "yaqa"
        self.__dict__.update(QuantConfig.from_dict(fields).to_dict())

    @classmethod
    def of(cls, config: QuantConfig) -> YaqaHfConfig:
        return cls(**config.to_dict())

    def quant_config(self) -> QuantConfig:
        """The plain config."""
        return QuantConfig.from_dict(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """What config.json holds: the fields, with the layer specs grouped (:func:`group_specs`), and the
        format version of that layout."""
        fields = super().to_dict()
        return {**fields, "format_version": 3 if fields.get("routed_experts") else 2,
                "modules": group_specs(fields["modules"])}


class YaqaSavedConfig(PretrainedConfig):
    """The ``config.json`` of a saved yaqa model: ``model_type`` ``"yaqa_ext"``, which transformers does not know
    unless yaqa_ext is imported, so a plain ``from_pretrained`` stops (asking for ``trust_remote_code``, which runs
    the folder's loader, which imports yaqa_ext, or names yaqa_ext when it is not installed) instead of filling
    the quantized layers with random weights. The architecture's own type is ``"yaqa_model_type"``; reading the
    file gives that architecture's config."""

    model_type = SAVED_MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        arch = config_dict.get("yaqa_model_type")
        if arch not in CONFIG_MAPPING:
            raise ValueError(f"config.json: yaqa_model_type {arch!r} is not an architecture this transformers knows; "
                             "install the transformers version the model was saved with (its transformers_version)")
        auto_map = {k: v for k, v in config_dict.get("auto_map", {}).items() if k != "AutoConfig"}
        plain = {k: v for k, v in config_dict.items() if k not in ("yaqa_model_type", "auto_map")}
        out = CONFIG_MAPPING[arch].from_dict({**plain, "model_type": arch, **({"auto_map": auto_map} if auto_map else {})},
                                             **kwargs)
        mark_quantized(out[0] if isinstance(out, tuple) else out)
        return out


def _saved_form(config_dict: dict[str, Any]) -> dict[str, Any]:
    """An architecture's config dict as :class:`YaqaSavedConfig` writes it."""
    auto_map = {**config_dict.get("auto_map", {}), "AutoConfig": f"{LOADER_MODULE}.{YaqaSavedConfig.__name__}"}
    return {**config_dict, "model_type": SAVED_MODEL_TYPE, "yaqa_model_type": config_dict["model_type"],
            "auto_map": auto_map}


@functools.cache
def _saving_class(base: type[PretrainedConfig]) -> type[PretrainedConfig]:
    """``base`` whose JSON form is :class:`YaqaSavedConfig`'s and whose ``save_pretrained`` also writes the loader
    beside it; under ``base``'s own name, which transformers' auto mappings go by."""

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(_saved_form(json.loads(base.to_json_string(self, use_diff))), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(_LOADER_SOURCE, Path(save_directory) / f"{LOADER_MODULE}.py")
        base.save_pretrained(self, save_directory, push_to_hub=push_to_hub, **kwargs)

    def __reduce_ex__(self, protocol: int):
        return _saving_instance, (base, self.__dict__)

    return type(base.__name__, (base,), {"__module__": base.__module__, "__qualname__": base.__qualname__,
                                         "_yaqa_base": base, "to_json_string": to_json_string,
                                         "save_pretrained": save_pretrained, "__reduce_ex__": __reduce_ex__})


def _saving_instance(base: type[PretrainedConfig], state: dict[str, Any]) -> PretrainedConfig:
    """The inverse of pickling a marked config (whose class is not importable by name)."""
    config = base.__new__(_saving_class(base))
    config.__dict__.update(state)
    return config


def mark_quantized(config: PretrainedConfig) -> None:
    """Make ``config`` (a quantized model's, in place) save as :class:`YaqaSavedConfig`; it reads and behaves as
    before, an instance of its own class."""
    if getattr(type(config), "_yaqa_base", None) is None:
        config.__class__ = _saving_class(type(config))


def unmark_quantized(config: PretrainedConfig) -> None:
    """Undo :func:`mark_quantized` (a dequantized model saves as its architecture)."""
    base = getattr(type(config), "_yaqa_base", None)
    if base is not None:
        config.__class__ = base


def dequantize(model: nn.Module, lowrank: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every :class:`QuantizedLinear` by an ``nn.Linear`` holding its effective weight, in place
    (``lowrank=False``: without the low-rank term, the base of a QLoRA-style adapter from
    :func:`export_lora`), in ``dtype`` (default: the model's, ``model.dtype``, so a bf16 model stays bf16), and
    MoE experts quantized one per expert back into the architecture's fused module
    (:func:`yaqa_ext.arch.fuse_experts`). The model no longer carries a ``quantization_config``."""
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
    fuse_experts(model, dtype)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
        unmark_quantized(config)
    return model


def export_lora(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write the low-rank terms of a quantized model as a PEFT LoRA adapter (``adapter_config.json``,
    ``adapter_model.safetensors``): ``lora_B = A``, ``lora_A = B``, ``alpha = r`` (scaling 1). Load it with
    ``peft.PeftModel.from_pretrained(base, out_dir)`` on ``dequantize(copy, lowrank=False)`` of the model:
    the QLoRA-style initialisation of QERA."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and m.lowrank_A is not None}
    if not layers:
        raise ValueError("no layer has a low-rank term: quantize with QuantConfig(lowrank_rank=k) first")
    experts = [n for n in layers if any(n.startswith(f"{r}.") for r, m in model.named_modules() if isinstance(m, RoutedExperts))]
    if experts:
        raise ValueError(f"{experts[0]} (and {len(experts) - 1} more) are MoE experts' matrices, which dequantize fuses "
                         "back into the architecture's experts module: a LoRA adapter has nothing to attach to there; "
                         "skip the experts' low-rank terms (QuantConfig(skip=...)) or quantize them without")
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


def _check_float_experts_loaded(name: str, experts: nn.Module) -> None:
    """Raise ValueError unless every float weight of an MoE layer stored one matrix per expert was read from the
    files (transformers releases that merge per-expert checkpoint weights into fused tensors on load leave them)."""
    import transformers

    for key, p in experts.named_parameters():
        if not getattr(p, "_is_hf_initialized", False):
            raise ValueError(f"{name}.{key} (an MoE expert kept in float beside quantized ones) was not read from the "
                             f"folder: transformers {transformers.__version__} merges per-expert weights on load; load it "
                             "with a newer transformers (tested: 5.17), or quantize the model with every expert of that "
                             "layer quantized (or none)")


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
        mark_quantized(model.config)  # saved again it keeps the protected form (older folders gain it)
        if self.pre_quantized:
            unfuse_experts(model, self.quantization_config.routed_experts)
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
        for name in self.quantization_config.routed_experts:
            _check_float_experts_loaded(name, model.get_submodule(name))
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        return dequantize(model, dtype=dtype)

    @property
    def is_trainable(self) -> bool:
        return False


# Registered once (a re-import must not trip transformers' "already registered" check).
if SAVED_MODEL_TYPE not in CONFIG_MAPPING:
    AutoConfig.register(SAVED_MODEL_TYPE, YaqaSavedConfig)
if "yaqa" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config("yaqa")(YaqaHfConfig)
if "yaqa" not in AUTO_QUANTIZER_MAPPING:
    register_quantizer("yaqa")(YaqaHfQuantizer)
