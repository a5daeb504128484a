"""Quantize a model layer by layer: normalise and RHT-transform the Kronecker factors, damped block LDL,
adaptive rounding (two-sided YAQA, one-sided LDLQ, or round-to-nearest), QuantizedLinear in place."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .codebooks import QuantParams
from .hadamard import RHT
from .hessians import HessianFactors, _mix, collect_hessians, find_targets, load_hessians
from .hf import QuantConfig, replace_module
from .ldl import block_ldl
from .qlinear import QuantizedLinear
from .rounding import Rounded, ldlq_round, proxy_loss, round_to_nearest

__all__ = ["LayerReport", "QuantReport", "quantize"]


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    tiles: tuple[int, int]
    damp_in: float | None
    """Relative damping that made H_in factor (None: not used)."""
    damp_out: float | None
    proxy_two_sided: float | None
    """tr(dW H_I dW^T H_O) / tr(W H_I W^T H_O) (None without H_O)."""
    proxy_one_sided: float | None
    """tr(dW H_I dW^T) / tr(W H_I W^T) (None without H_I)."""
    bits_per_weight: float
    seconds: float


@dataclass
class QuantReport:
    config: QuantConfig
    layers: list[LayerReport]

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight over all quantized layers (weighted by size)."""
        sizes = [r.shape[0] * r.shape[1] for r in self.layers]
        return sum(r.bits_per_weight * s for r, s in zip(self.layers, sizes)) / sum(sizes)

    def table(self) -> str:
        def fmt(v: float | None, spec: str) -> str:
            return "-" if v is None else format(v, spec)

        lines = [f"{self.config.summary()}: {len(self.layers)} layers, {self.bits_per_weight:.3f} bits/weight",
                 f"{'layer':42s} {'shape':>11s} {'tiles':>6s} {'damp I':>7s} {'damp O':>7s} {'proxy 2s':>9s} "
                 f"{'proxy 1s':>9s} {'bits/w':>6s} {'s':>6s}"]
        for r in self.layers:
            lines.append(
                f"{r.name:42s} {r.shape[0]:>5d}x{r.shape[1]:<5d} {r.tiles[0]:>2d}x{r.tiles[1]:<3d} "
                f"{fmt(r.damp_in, '7.3g')} {fmt(r.damp_out, '7.3g')} {fmt(r.proxy_two_sided, '9.4f')} "
                f"{fmt(r.proxy_one_sided, '9.4f')} {r.bits_per_weight:6.3f} {r.seconds:6.2f}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "bits_per_weight": self.bits_per_weight,
                "layers": [asdict(r) for r in self.layers]}

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def _tile(size: int, cap: int) -> int:
    """The largest tile size <= cap that divides size."""
    return max(d for d in range(1, min(size, cap) + 1) if size % d == 0)


def _weight(module: nn.Module) -> Tensor:
    """The (out, in) fp32 weight of an nn.Linear or a GPT-2 Conv1D (stored in x out)."""
    W = module.weight.detach()
    return (W if isinstance(module, nn.Linear) else W.T).float()


def _relative(dW: Tensor, W: Tensor, H_in: Tensor, H_out: Tensor | None) -> float:
    return proxy_loss(dW, H_in, H_out) / max(proxy_loss(W, H_in, H_out), 1e-300)


def _round_layer(
    W: Tensor, H_in: Tensor | None, H_out: Tensor | None, config: QuantConfig, tiles: tuple[int, int], params: QuantParams
) -> tuple[Rounded, float | None, float | None]:
    if config.method == "rtn":
        return round_to_nearest(W, params), None, None
    td_x, td_y = tiles
    ldl_in = block_ldl(H_in, td_y, damp=config.sigma_reg, damp_step=config.sigma_reg)
    ldl_out = block_ldl(H_out, td_x, damp=config.sigma_reg, damp_step=config.sigma_reg) if config.method == "yaqa" else None
    rounded = ldlq_round(W, ldl_in.L, None if ldl_out is None else ldl_out.L, quantizer=params, td_x=td_x, td_y=td_y)
    return rounded, ldl_in.damp, None if ldl_out is None else ldl_out.damp


@torch.no_grad()
def quantize(
    model: nn.Module,
    config: QuantConfig,
    hessians: str | os.PathLike | HessianFactors | None = None,
    data=None,
    *,
    tokenizer=None,
    sketch: str = "B",
    n_seqs: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    collect_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> QuantReport:
    """Quantize every linear layer of the decoder blocks in place; returns the per-layer report.

    ``method="yaqa"`` needs H_in and H_out (a Sketch A or B collection), ``"ldlq"`` H_in (any
    collection, e.g. ``sketch="input"``), ``"rtn"`` nothing. Without ``hessians`` but with ``data``
    the factors are collected first (``sketch``, ``n_seqs``, ``seq_len``; into ``collect_dir`` or a
    temporary folder). Per layer: factors normalised by their mean diagonal, RHT (``config.rht``),
    ``block_ldl`` with damping ``sigma_reg`` (retried with more), rounding, and a
    :class:`QuantizedLinear` in place of the layer. ``model.config.quantization_config`` is set, so
    ``model.save_pretrained`` writes a folder ``AutoModelForCausalLM.from_pretrained`` can load.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a yaqa_ext.QuantConfig, got {type(config).__name__}")
    if config.method != "rtn" and hessians is None and data is None:
        raise ValueError(f"method {config.method!r} needs Hessian factors: pass hessians=DIR (from collect_hessians) or data=...")
    if config.method == "ldlq" and hessians is None:
        sketch = "input"
    targets = [t for t in find_targets(model) if not config.skips(t.name)]
    if not targets:
        raise ValueError("every linear layer is skipped (config.skip); nothing to quantize")
    factors: HessianFactors | None = None
    tmp = None
    if config.method != "rtn":
        if hessians is None:
            if collect_dir is None:
                tmp = tempfile.TemporaryDirectory(prefix="yaqa-hessians-")
                collect_dir = tmp.name
            collect_hessians(model, data, collect_dir, tokenizer=tokenizer, sketch=sketch, n_seqs=n_seqs, seq_len=seq_len,
                             batch_size=batch_size, progress=progress)
            hessians = collect_dir
        factors = hessians if isinstance(hessians, HessianFactors) else load_hessians(hessians)
        missing = [t.name for t in targets if t.name not in factors]
        if missing:
            raise ValueError(f"{factors.path} has no factors for {len(missing)} layers (first: {missing[0]}); "
                             "collect them, or skip those layers with QuantConfig(skip=[...])")
        if config.method == "yaqa" and factors.sketch == "input":
            raise ValueError(f"{factors.path} holds input moments only (sketch 'input'); method 'yaqa' needs H_out "
                             "from a Sketch A or B collection (or use method='ldlq')")
    quantizer = config.make_quantizer()
    reports = []
    modules: dict[str, dict] = {}
    try:
        for t in tqdm(targets, desc=f"quantize {config.summary()}", unit="layer", disable=not progress):
            start = time.perf_counter()
            device = t.module.weight.device
            W = _weight(t.module)
            m, n = W.shape
            H_in = H_out = None
            if factors is not None:
                H_in, H_out = factors.load(t.name, device)
                H_in = H_in / H_in.diagonal().mean()
                H_out = None if H_out is None else H_out / H_out.diagonal().mean()
            rht = RHT(m, n, seed=_mix(config.seed, t.name) % 2**31, device=device) if config.rht else None
            if rht is not None:
                W = rht.transform_weight(W)
                H_in = None if H_in is None else rht.transform_input_factor(H_in)
                H_out = None if H_out is None else rht.transform_output_factor(H_out)
            params = quantizer.params(W)
            tiles = (_tile(m, config.td_x), _tile(n, config.td_y))
            rounded, damp_in, damp_out = _round_layer(W, H_in, H_out, config, tiles, params)
            bias = getattr(t.module, "bias", None)
            layer = QuantizedLinear.from_rounding(rounded.codes, params, rht, bias)
            replace_module(model, t.name, layer)
            modules[t.name] = layer.spec()
            dW = rounded.W_hat - W
            reports.append(LayerReport(
                name=t.name, shape=(m, n), tiles=tiles, damp_in=damp_in, damp_out=damp_out,
                proxy_two_sided=None if H_in is None or H_out is None else _relative(dW, W, H_in, H_out),
                proxy_one_sided=None if H_in is None else _relative(dW, W, H_in, None),
                bits_per_weight=layer.bits_per_weight(), seconds=time.perf_counter() - start,
            ))
    finally:
        if tmp is not None:
            tmp.cleanup()
    config.modules = modules
    if hasattr(model, "config"):
        model.config.quantization_config = config
    return QuantReport(config, reports)
