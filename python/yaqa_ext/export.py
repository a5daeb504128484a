"""Export for serving engines: a quantized model in the ``compressed-tensors`` ``pack-quantized`` layout, which vLLM,
SGLang and transformers load without yaqa_ext.

What exports: INT-codebook layers without the random Hadamard transform, low-rank terms or channel scales (those
have no counterpart in the format), replacing ``nn.Linear`` modules of a dense model. Per layer, with ``u`` our
stored codes and ``s`` / ``z`` our scales and zero points, the format's weight is ``W = (u - z') * s'``:

- asymmetric grids (integer zero points, ``QuantConfig(symmetric=False)``): the same b bits, ``z' = z``, ``s' = s``;
- symmetric grids are midrise (``z = (2^b - 1) / 2``, not an integer), which b-bit integers cannot express: with
  ``widen_symmetric=True`` they export exactly as symmetric (b + 1)-bit codes ``2u + 1`` with scales ``s / 2``
  (5 bits for a 4-bit model: most serving kernels run 4 and 8 bits only); otherwise they are refused.

Scales per output row (``"channel"``; a per-tensor scale repeated) or per row and column group (``"group"``). The
format computes ``(u - z') * s'`` in the scales' dtype (``dtype``), exactly when that dtype holds the fp16 scales
and their products (fp32); in fp16 / bf16 the products round like any fp16 / bf16 weight.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .arch import RoutedExperts
from .bitpack import pack_codes
from .fileio import atomic_dir
from .hf import unmark_quantized
from .qlinear import QuantizedLinear

__all__ = ["export_compressed_tensors"]

FORMAT = "pack-quantized"


def _words(stream: Tensor, n: int, bits: int) -> Tensor:
    """A per-row little-endian bit stream (uint8, from :func:`pack_codes`) of n codes as the format's int32 words:
    ``ceil(n bits / 32)`` per row (the stream's zero padding cut or extended)."""
    size = 4 * -(-n * bits // 32)
    stream = stream[:, :size] if stream.size(1) >= size else torch.nn.functional.pad(stream, (0, size - stream.size(1)))
    return stream.contiguous().view(torch.int32)


def _refusal(name: str, layer: QuantizedLinear, widen: bool) -> str | None:
    """Why a layer cannot be exported, or None."""
    if layer.codebook != "int":
        return f"codebook {layer.codebook!r} (only the INT grid has a compressed-tensors form)"
    if layer.sign_in is not None:
        return ("the random Hadamard transform (the format holds it only as dense per-layer matrices that "
                "transformers ignores on load): quantize with rht=False (--no-rht)")
    if layer.lowrank_A is not None:
        return "a low-rank term (quantize without lowrank_rank)"
    if layer.in_scale is not None or layer.out_scale is not None:
        return "fine-tuned channel scales (quantize without fine-tuning)"
    symmetric = bool((layer.zeros.float() == (2 ** layer.layout["bits"] - 1) / 2).all())
    if not symmetric and not bool((layer.zeros.float() == layer.zeros.float().round()).all()):
        return "zero points that are not integers"
    if symmetric and layer.layout["bits"] == 8:
        return "a symmetric (midrise) 8-bit grid, which needs 9-bit integers: quantize with symmetric=False (--asymmetric)"
    if symmetric and not widen:
        return (f"a symmetric (midrise) {layer.layout['bits']}-bit grid, which needs {layer.layout['bits'] + 1}-bit "
                "integers in the format: pass widen_symmetric=True (--widen-symmetric) to export it exactly so, or "
                "quantize with symmetric=False (--asymmetric)")
    return None


def _layer_tensors(layer: QuantizedLinear, dtype: torch.dtype) -> tuple[dict[str, Tensor], dict]:
    """The format's tensors of one layer and its weight arguments."""
    bits, group_size = layer.layout["bits"], layer.layout["group_size"]
    m, n = layer.out_features, layer.in_features
    codes, _ = layer.book.unpack(layer)
    scales = layer.scales.float().expand(m, n // group_size)
    zeros = layer.zeros.float().expand(m, n // group_size)
    symmetric = bool((zeros == (2**bits - 1) / 2).all())
    if symmetric:  # (u - (2^b - 1) / 2) s = ((2u + 1) - 2^b) (s / 2): symmetric (b + 1)-bit codes
        codes, bits, scales = codes * 2 + 1, bits + 1, scales / 2
    out = {"weight_packed": _words(pack_codes(codes.to(torch.uint8), bits), n, bits),
           "weight_scale": scales.to(dtype).contiguous(),
           "weight_shape": torch.tensor([m, n], dtype=torch.int64)}
    if not symmetric:  # packed along the output dimension
        out["weight_zero_point"] = _words(pack_codes(zeros.T.to(torch.uint8).contiguous(), bits), m, bits).T.contiguous()
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().to(dtype)
    strategy = "channel" if group_size == n else "group"
    args = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
            "group_size": group_size if strategy == "group" else None, "dynamic": False}
    return {k: v.cpu() for k, v in out.items()}, args


def _plain_config(model: nn.Module, dtype: torch.dtype):
    """The architecture's own config (no yaqa_ext marks or quantization_config), in ``dtype``."""
    config = copy.deepcopy(model.config)
    unmark_quantized(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    return config


def export_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None,
                              dtype: torch.dtype = torch.float16, widen_symmetric: bool = False) -> Path:
    """Write ``model`` (quantized by :func:`yaqa_ext.quantize`, or loaded from such a folder) to ``out_dir`` in the
    compressed-tensors ``pack-quantized`` layout (config.json with its ``quantization_config``, safetensors, the
    generation config and ``tokenizer`` if given); the other parameters in ``dtype``. Load it with
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` (the ``compressed-tensors`` package) or ``vllm serve out_dir``.
    Every layer that cannot be exported is named in one ValueError (see the module docstring); ``out_dir`` must
    not exist or be empty, and appears whole or not at all."""
    from transformers import AutoModelForCausalLM

    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        raise ValueError("the model has no quantized layer: quantize it first (yaqa_ext.quantize / yaqa quantize)")
    if any(isinstance(m, RoutedExperts) for m in model.modules()):
        raise ValueError("MoE experts quantized one matrix per expert have no compressed-tensors export yet")
    config = _plain_config(model, dtype)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    refused = {name: why for name, layer in layers.items()
               if (why := _refusal(name, layer, widen_symmetric)
                   or (None if isinstance(skeleton.get_submodule(name), nn.Linear)
                       else f"it replaces a {type(skeleton.get_submodule(name)).__name__}, which the format's "
                            "'Linear' targets do not match"))}
    if refused:
        raise ValueError("cannot export to compressed-tensors: " + "; ".join(f"{n}: {w}" for n, w in refused.items()))
    tensors, schemes = {}, {}
    for name, layer in layers.items():
        parts, args = _layer_tensors(layer, dtype)
        tensors.update({f"{name}.{k}": v for k, v in parts.items()})
        schemes.setdefault(json.dumps(args, sort_keys=True), []).append(name)
    quantized_params = {f"{name}.{k}" for name, layer in layers.items() for k, _ in layer.named_buffers()} | {
        f"{name}.bias" for name in layers}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if key in quantized_params:
            continue
        if value.data_ptr() in seen and getattr(config, "tie_word_embeddings", False):
            continue  # the tied copy (lm_head) is restored by the loader
        seen.add(value.data_ptr())
        tensors[key] = (value.detach().to(dtype) if value.is_floating_point() else value.detach()).cpu().contiguous()
    config_groups = {f"group_{i}": {"targets": names if len(schemes) > 1 else ["Linear"], "weights": json.loads(args),
                                    "input_activations": None, "output_activations": None, "format": FORMAT}
                     for i, (args, names) in enumerate(schemes.items())}
    ignore = sorted(n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and n not in layers)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder: choose a new one")
    if out.exists():
        out.rmdir()
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config_dict = config.to_dict()
        config_dict["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {},
            "transform_config": {}}
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
