"""Quantize a model layer by layer: normalise and RHT-transform the Kronecker factors, damped block LDL,
adaptive rounding (two-sided YAQA, one-sided LDLQ, or round-to-nearest), QuantizedLinear in place."""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .codebooks import Codebook, Grid
from .hadamard import RHT
from .data import prepare_tokens
from .finetune import BlockCheckpoint, finetune_end_to_end, quantize_blocks
from .arch import (Coverage, RoutedExperts, TargetModule, coverage, decoder_layers, find_targets, fuse_experts,
                   is_fused_experts, replace_module, unfuse_experts, weight_matrix)
from .hessians import TWO_SIDED_SKETCHES, HessianFactors, _fingerprint, _mix, collect_hessians, load_hessians
from .config import QuantConfig
from .hf import YaqaHfConfig, mark_quantized
from .ldl import block_ldl
from .lowrank import INPUT_STAT_METHODS, lowrank_correction
from .methods import LayerFactors, Method, get_method
from .progress import progress_bar
from .qlinear import QuantizedLinear, effective_weight
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
    """tr(dW H_I dW^T H_O) / tr(W H_I W^T H_O) of the final layer, low-rank term included (None without
    both factors)."""
    proxy_one_sided: float | None
    """tr(dW H_I dW^T) / tr(W H_I W^T) (None without H_I)."""
    lowrank: str | None
    """'method:rank' of the low-rank term, if any."""
    bits_per_weight: float
    seconds: float
    tokens: int | None = None
    """Calibration tokens that reached the layer in one pass (None: no collection, or one made before they were
    counted); for an MoE expert's matrix, the tokens routed to the expert."""
    fallback: str | None = None
    """For an MoE expert below ``QuantConfig.expert_min_tokens``: the factors it was rounded with instead."""


@dataclass
class QuantReport:
    config: QuantConfig
    layers: list[LayerReport]
    coverage: Coverage | None = None
    """The decoder weights the targets cover, and those left in float with why."""
    finetune: list[tuple[str, float, float]] = field(default_factory=list)
    """Per fine-tuned group of layers (``config.finetune_epochs``): its first layer, the block's mean squared
    output error on held-out calibration sequences before fine-tuning and after."""
    finetune_e2e: tuple[float, float] | None = None
    """The held-out KL to the original before and after the end-to-end fine-tune (``config.finetune_e2e_epochs``)."""

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight over all quantized layers (weighted by size)."""
        sizes = [r.shape[0] * r.shape[1] for r in self.layers]
        return sum(r.bits_per_weight * s for r, s in zip(self.layers, sizes)) / sum(sizes)

    def table(self) -> str:
        def fmt(v: float | None, spec: str) -> str:
            return "-" if v is None else format(v, spec)

        lines = [f"{self.config.summary()}: {len(self.layers)} layers, {self.bits_per_weight:.3f} bits/weight"]
        lines += [] if self.coverage is None else [self.coverage.summary()]
        fallbacks = [r for r in self.layers if r.fallback is not None]
        lines += [f"{len(fallbacks)} MoE expert matrices saw fewer than {self.config.expert_min_tokens} tokens: "
                  + ", ".join(f"{r.name} ({r.tokens} tokens: {r.fallback})" for r in fallbacks)] if fallbacks else []
        lines += [f"{'layer':42s} {'shape':>11s} {'tiles':>6s} {'damp I':>7s} {'damp O':>7s} {'proxy 2s':>9s} "
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
                "coverage": None if self.coverage is None else asdict(self.coverage),
                "layers": [asdict(r) for r in self.layers],
                "finetune": [{"group": g, "error_before": a, "error_after": b} for g, a, b in self.finetune],
                "finetune_e2e": None if self.finetune_e2e is None else dict(zip(("kl_before", "kl_after"), self.finetune_e2e))}

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def _tile(size: int, cap: int, unit: int) -> int:
    """The largest tile size <= cap that divides size and is a multiple of the codebook's unit."""
    sizes = [d for d in range(unit, min(size, max(cap, unit)) + 1, unit) if size % d == 0]
    if not sizes:
        raise ValueError(f"a size of {size} cannot be cut into tiles of a multiple of the codebook's unit {unit}")
    return max(sizes)


def _relative(dW: Tensor, W: Tensor, H_in: Tensor, H_out: Tensor | None) -> float:
    return proxy_loss(dW, H_in, H_out) / max(proxy_loss(W, H_in, H_out), 1e-300)


def _damped_ldl(H: Tensor | None, block: int, config: QuantConfig) -> tuple[Tensor | None, float | None]:
    if H is None:
        return None, None
    ldl = block_ldl(H, block, damp=config.sigma_reg, damp_step=config.sigma_reg)
    return ldl.L, ldl.damp


ROUNDING_SCALES = (0.9, 1.0, 1.1, 1.2, 1.3)
"""The factors on the grid's scales that ``QuantConfig.rounding_scale_search`` tries (measured on SmolLM2 at
2 bits: LDLQ's proxy is least at ~1.0, YAQA's at 1.0-1.3 depending on the layer)."""


def _adaptive_round(Wt: Tensor, grid: Grid, L_in: Tensor | None, L_out: Tensor | None, H_in: Tensor | None,
                    H_out: Tensor | None, tiles: tuple[int, int], search: bool) -> tuple[Rounded, Grid]:
    """LDLQ on ``grid`` or, with ``search``, on each of its scalings by ``ROUNDING_SCALES``, keeping the one of
    least proxy loss ``tr(dW H_in dW^T H_out)`` (the factors the rounding fed back; None: identity)."""
    def run(g: Grid) -> tuple[Rounded, Grid]:
        return ldlq_round(Wt, L_in, L_out, quantizer=g, td_x=tiles[0], td_y=tiles[1]), g

    if not search:
        return run(grid)
    eye = torch.eye(Wt.size(1), dtype=Wt.dtype, device=Wt.device) if H_in is None else H_in
    return min((run(grid.scaled(f)) for f in ROUNDING_SCALES), key=lambda r: proxy_loss(r[0].W_hat - Wt, eye, H_out))


def _column_scale(W: Tensor, quantizer: Codebook, rht: RHT | None) -> Tensor | None:
    """The input-column scaling d (fp16 values) minimising ||W - Q(W diag d) diag(1/d)||_F over
    d = (mean_i |W_ij|)^-a for a in 0.25..1 (normalised to a geometric mean of 1; it evens out the
    columns so that one scale per row suits them all), or None if none beats no scaling: the
    calibration-free mode's optional learned transform of single matrices."""

    def error(d: Tensor | None) -> float:
        Wd = W if d is None else W * d
        Wt = Wd if rht is None else rht.transform_weight(Wd)
        back = round_to_nearest(Wt, quantizer).W_hat
        back = back if rht is None else rht.inverse_weight(back)
        return float((W - (back if d is None else back / d)).square().sum())

    magnitude = W.abs().mean(0).clamp_min(1e-8)
    best, best_err = None, error(None)
    for a in (0.25, 0.5, 0.75, 1.0):
        d = magnitude ** -a
        d = (d / d.log().mean().exp()).clamp(2**-14, 65504.0).half().float()
        err = error(d)
        if err < best_err:
            best, best_err = d, err
    return best


def _quantize_layer(
    W0: Tensor,
    bias: Tensor | None,
    name: str,
    config: QuantConfig,
    quantizer: Codebook,
    H_in: Tensor | None,
    H_out: Tensor | None,
    stats: dict[str, Tensor | None],
) -> tuple[QuantizedLinear, LayerReport]:
    """Round one (out, in) weight with normalised factors (None: identity) and build its layer."""
    start = time.perf_counter()
    m, n = W0.shape
    device = W0.device
    method = get_method(config.method)
    rht = RHT(m, n, seed=_mix(config.seed, name) % 2**31, device=device) if config.rht else None
    in_scale = None
    if method.column_scale and config.datafree_transform and H_in is None and H_out is None:
        in_scale = _column_scale(W0, quantizer, rht)
    W = W0 if in_scale is None else W0 * in_scale
    Wt, Hi, Ho = W, H_in, H_out
    if rht is not None:
        Wt = rht.transform_weight(W)
        Hi = None if Hi is None else rht.transform_input_factor(Hi)
        Ho = None if Ho is None else rht.transform_output_factor(Ho)
    grid = quantizer.fit(Wt)
    unit = type(quantizer).unit
    tiles = (_tile(m, config.td_x, unit[0]), _tile(n, config.td_y, unit[1]))
    Hi, Ho = (Hi if method.feedback[0] else None), (Ho if method.feedback[1] else None)
    if Hi is None and Ho is None:
        rounded: Rounded = round_to_nearest(Wt, grid)
        damp_in = damp_out = None
    else:
        L_in, damp_in = _damped_ldl(Hi, tiles[1], config)
        L_out, damp_out = _damped_ldl(Ho, tiles[0], config)
        rounded, grid = _adaptive_round(Wt, grid, L_in, L_out, Hi, Ho, tiles, config.rounding_scale_search)
    lowrank, terms = None, None
    if config.lowrank_rank > 0:
        method = config.lowrank_method
        if method == "auto":
            method = "kl" if H_in is not None and H_out is not None else "qera-exact" if stats["R"] is not None else "svd"
        A, B = lowrank_correction(W0 - effective_weight(rounded.W_hat, rht, in_scale), config.lowrank_rank, method,
                                  x_abs_mean=stats["x_abs"], R=stats["R"], H_in=H_in, H_out=H_out)
        terms = (A.half().float(), B.half().float())
        lowrank = f"{method}:{A.size(1)}"
    layer = QuantizedLinear.from_rounding(rounded, grid, rht, bias, lowrank=terms, in_scale=in_scale,
                                          channel_scales=config.finetune_epochs > 0 or config.finetune_e2e_epochs > 0)
    dW = W0 - effective_weight(rounded.W_hat, rht, in_scale, terms)  # = W0 - layer.weight_matrix() (W_hat is exact)
    report = LayerReport(
        name=name, shape=(m, n), tiles=tiles, damp_in=damp_in, damp_out=damp_out,
        proxy_two_sided=None if H_in is None or H_out is None else _relative(dW, W0, H_in, H_out),
        proxy_one_sided=None if H_in is None else _relative(dW, W0, H_in, None),
        lowrank=lowrank, bits_per_weight=layer.bits_per_weight(), seconds=time.perf_counter() - start,
    )
    return layer, report


def _misfits(targets: list[TargetModule], config: QuantConfig) -> dict[str, str]:
    """The targets whose shape the codebook's unit does not divide (E8P: 8 input columns, trellis: 16 x 16), with
    why: they stay in float (and are listed in the coverage warning)."""
    rows, cols = type(config.make_quantizer()).unit
    return {t.name: f"shape {t.out_features} x {t.in_features} not a multiple of the {config.quantizer} codebook's "
                    f"unit {rows} x {cols}"
            for t in targets if t.out_features % rows or t.in_features % cols}


def _warn_untargeted(covered: Coverage) -> None:
    """Warn of every decoder matrix left in float that the user did not skip, with why."""
    by_reason: dict[str, list[str]] = {}
    for name, why in covered.untargeted.items():
        if not why.startswith("skipped"):
            by_reason.setdefault(why, []).append(name)
    if by_reason:
        warnings.warn(f"{100 * covered.fraction:.1f}% of the decoder weights are quantization targets; left in float "
                      "(not in QuantConfig.skip): " + "; ".join(f"{why}: {', '.join(names)}" for why, names in by_reason.items()),
                      stacklevel=4)  # past torch.no_grad's wrapper of quantize


def _open(source: str | os.PathLike | HessianFactors | None) -> HessianFactors | None:
    if source is None or isinstance(source, HessianFactors):
        return source
    return load_hessians(source)


def _check_lowrank_statistics(config: QuantConfig, hessians: HessianFactors | None, moments: HessianFactors | None,
                              collecting: str | None) -> None:
    """Fail before any collection or rounding if the low-rank method's statistics cannot be there
    (``collecting``: the sketch quantize() is about to collect, if any)."""
    lowrank = config.lowrank_method if config.lowrank_rank > 0 else None
    sketch = hessians.sketch if hessians is not None else collecting
    if lowrank in INPUT_STAT_METHODS and moments is None and sketch != "input":
        raise ValueError(f"lowrank_method {lowrank!r} needs the input statistics: pass input_moments=DIR from "
                         "collect_hessians(..., sketch='input') (CLI: --input-moments), or hessians from one")
    if lowrank == "kl" and (get_method(config.method).own_factors or sketch not in TWO_SIDED_SKETCHES):
        raise ValueError("lowrank_method 'kl' needs YAQA's two factors H_in and H_out: use it with hessians from "
                         "a Sketch A or B collection and method 'yaqa' or 'ldlq' (or choose another lowrank_method)")


def _check_sketch(method: Method, factors: HessianFactors | None) -> None:
    """Fail unless the collection is one the method rounds with (when it reads one)."""
    if factors is None or not method.needs_data or factors.sketch in method.sketches:
        return
    if factors.sketch == "input":
        raise ValueError(f"{factors.path} holds input moments only (sketch 'input'); method {method.name!r} needs "
                         f"H_out from a collection of sketch {' or '.join(method.sketches)} (or use method='ldlq')")
    raise ValueError(f"{factors.path} is a Sketch {factors.sketch} collection; method {method.name!r} needs one of "
                     f"the sketches {method.sketches}")


def _normalised(H: Tensor | None, name: str, side: str) -> Tensor | None:
    """H / mean(diag H); None (the identity: no feedback on that side) for a zero factor, e.g. a dead layer."""
    if H is None:
        return None
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"layer {name}: {side} has NaN or infinite entries; the factor file is corrupt or the "
                         "collection diverged: collect it again")
    scale = H.diagonal().mean()
    if not scale > 0:
        warnings.warn(f"layer {name}: {side} is zero (mean diagonal {float(scale):g}: no calibration signal reached "
                      "this layer); that side is rounded without feedback (identity factor)", stacklevel=3)
        return None
    return H / scale


def _run_settings(config: QuantConfig, factors: HessianFactors | None, moments: HessianFactors | None,
                  batch_size: int) -> dict:
    """What a fine-tuned run's checkpoint of blocks must agree on, besides the model and the tokens (not the
    end-to-end fine-tune, which runs after the blocks)."""
    return {"config": {k: v for k, v in config.to_dict().items() if k not in ("modules", "finetune_e2e_epochs")},
            "batch_size": batch_size, "factors": None if factors is None else factors.manifest.get("fingerprint"),
            "moments": None if moments is None else moments.manifest.get("fingerprint")}


def _restore_blocks(model: nn.Module, checkpoint: BlockCheckpoint | None, modules: dict, reports: list,
                    finetuned: list, bar: tqdm) -> frozenset[int]:
    """Put a checkpoint's finished blocks back into ``model`` (their layers, trained parameters, reports); their
    indices."""
    if checkpoint is None:
        return frozenset()
    _, blocks = decoder_layers(model)
    done = set()
    for index, state, record in checkpoint.finished():
        for name, spec in record["modules"].items():
            device = next(model.get_submodule(name).parameters()).device
            replace_module(model, name, QuantizedLinear.from_spec(spec).to(device))
        blocks[index].load_state_dict(state)
        modules.update(record["modules"])
        reports += [LayerReport(**{**r, "shape": tuple(r["shape"]), "tiles": tuple(r["tiles"])}) for r in record["reports"]]
        finetuned += [tuple(entry) for entry in record["finetune"]]
        bar.update(len(record["modules"]))
        done.add(index)
    return frozenset(done)


def _quantize_finetuned(model: nn.Module, targets: list[TargetModule], config: QuantConfig, tokens: Tensor,
                        batch_size: int, checkpoint: BlockCheckpoint | None,
                        quantize_group: Callable[[list[TargetModule]], None], modules: dict, reports: list,
                        bar: tqdm) -> list[tuple[str, float, float]]:
    """:func:`yaqa_ext.finetune.quantize_blocks` from the checkpoint's last finished block, each block written
    to it as it ends; the fine-tuning log."""
    finetuned: list[tuple[str, float, float]] = []
    done = _restore_blocks(model, checkpoint, modules, reports, finetuned, bar)

    def on_block(index: int, block: nn.Module, log: list[tuple[str, float, float]]) -> None:
        names = [t.name for t in targets if t.layer == index]
        record = {"modules": {n: modules[n] for n in names},
                  "reports": [asdict(r) for r in reports if r.name in names], "finetune": log}
        checkpoint.save(index, block, record)

    return finetuned + quantize_blocks(model, targets, tokens, batch_size, config.finetune_epochs, config.finetune_lr,
                                       quantize_group, bar.set_postfix_str, done,
                                       None if checkpoint is None else on_block)


def _target_factors(t: TargetModule, config: QuantConfig, layer_factors: LayerFactors, factors: HessianFactors | None,
                    device: torch.device) -> tuple[Tensor | None, Tensor | None, int | None, str | None]:
    """A target's unnormalised ``(H_in, H_out)``, the calibration tokens that reached it, and for an MoE expert
    below ``config.expert_min_tokens`` the fallback taken: the sum of the factors of the same matrix over the
    layer's experts (``"shared"``), or none (``"rtn"``)."""
    tokens = None if factors is None or t.name not in factors else factors.tokens(t.name)
    if t.experts is None or tokens is None or tokens >= config.expert_min_tokens:
        return (*layer_factors(t.name, device), tokens, None)
    if config.expert_fallback == "rtn":
        return None, None, tokens, "round to nearest"
    pooled = [layer_factors(name, device) for name in t.pooled_names if name in factors]  # the collected ones
    H_in, H_out = (None if any(p[side] is None for p in pooled) else sum(p[side] for p in pooled) for side in (0, 1))
    return H_in, H_out, tokens, f"factors shared by the layer's {len(pooled)} experts"


def _quantize_target(t: TargetModule, config: QuantConfig, quantizer: Codebook, layer_factors: LayerFactors,
                     factors: HessianFactors | None, moments: HessianFactors | None) -> tuple[QuantizedLinear, LayerReport]:
    """One target's QuantizedLinear (from its current weight) and report; errors name the layer."""
    W0 = weight_matrix(t.module).float()
    H_in, H_out, tokens, fallback = _target_factors(t, config, layer_factors, factors, W0.device)
    stats = {"R": None if moments is None else moments.load(t.name, W0.device)[0],
             "x_abs": None if moments is None else moments.abs_mean(t.name, W0.device)}
    try:
        layer, report = _quantize_layer(W0, getattr(t.module, "bias", None), t.name, config, quantizer,
                                        _normalised(H_in, t.name, "H_in"), _normalised(H_out, t.name, "H_out"), stats)
    except (ValueError, torch.linalg.LinAlgError) as e:
        if str(e).startswith(f"layer {t.name}:"):
            raise
        raise type(e)(f"layer {t.name}: {e}") from e
    return layer, replace(report, tokens=tokens, fallback=fallback)


@torch.no_grad()
def quantize(
    model: nn.Module,
    config: QuantConfig,
    hessians: str | os.PathLike | HessianFactors | None = None,
    data=None,
    *,
    input_moments: str | os.PathLike | HessianFactors | None = None,
    tokenizer=None,
    sketch: str | None = None,
    n_seqs: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    collect_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> QuantReport:
    """Quantize every linear layer of the decoder blocks in place; returns the per-layer report.

    The method (:data:`yaqa_ext.methods.METHODS`) says which factors it needs: ``"yaqa"`` H_in and H_out
    (a Sketch A or B collection), ``"ldlq"`` H_in (any collection, e.g. ``sketch="input"``), ``"rtn"`` and
    ``"datafree"`` nothing. Without ``hessians`` but with ``data`` the factors are collected first
    (``sketch``, default the method's own; ``n_seqs``, ``seq_len``; into ``collect_dir`` or a temporary
    folder). Per layer: factors normalised by their mean diagonal,
    RHT (``config.rht``), ``block_ldl`` with damping ``sigma_reg`` (retried with more), rounding,
    the optional low-rank term (``config.lowrank_rank``; QERA / LQER statistics come from
    ``input_moments``, an ``sketch="input"`` collection, or from ``hessians`` if it is one), and a
    :class:`QuantizedLinear` in place of the layer. ``model.config.quantization_config`` is set to the
    Hugging Face form (:class:`yaqa_ext.hf.YaqaHfConfig`) of a copy of ``config`` recording each layer's spec
    (``config`` itself is not changed; ``report.config`` is that copy), so
    ``model.save_pretrained`` writes a folder ``AutoModelForCausalLM.from_pretrained`` can load (with yaqa_ext
    imported, or with ``trust_remote_code=True``; without either it refuses, see :class:`yaqa_ext.hf.YaqaSavedConfig`).
    ``config.finetune_epochs > 0``: the layers are rounded block by block, each block fine-tuned after each group
    of layers on the activations of ``data`` (``n_seqs`` x ``seq_len`` tokens, ``batch_size`` a step; see
    :mod:`yaqa_ext.finetune`); the trained norms and linears are the model's own parameters, saved with it.
    With ``checkpoint_dir`` each finished block is written there, and a run started again with the same model,
    configuration, data and factors resumes after the last one.
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a yaqa_ext.QuantConfig, got {type(config).__name__}")
    method = get_method(config.method)
    needs_factors = method.needs_data
    if needs_factors and hessians is None and data is None:
        raise ValueError(f"method {config.method!r} needs Hessian factors: pass hessians=DIR (from collect_hessians) or data=...")
    finetunes = config.finetune_epochs > 0 or config.finetune_e2e_epochs > 0
    if finetunes and data is None:
        raise ValueError(f"finetune_epochs={config.finetune_epochs} / finetune_e2e_epochs={config.finetune_e2e_epochs} "
                         "fine-tune on calibration data: pass data=... (the calibration text or tokens), or set both to 0")
    sketch = method.default_sketch if sketch is None else sketch
    if needs_factors and hessians is None and sketch not in method.sketches:
        raise ValueError(f"method {config.method!r} rounds with factors of the sketches {method.sketches}, not "
                         f"{sketch!r}: pass one of them as sketch=")
    hessians, input_moments = _open(hessians), _open(input_moments)
    if input_moments is not None and input_moments.sketch != "input":
        raise ValueError(f"input_moments: {input_moments.path} is a Sketch {input_moments.sketch} collection; the "
                         "low-rank statistics need one made with sketch='input' (yaqa collect --sketch input)")
    _check_lowrank_statistics(config, hessians, input_moments, sketch if needs_factors and hessians is None else None)
    fused = {n: m for n, m in model.named_modules() if is_fused_experts(m)}
    unfuse_experts(model)
    tmp, modules = None, {}
    try:
        candidates = find_targets(model)
        left = {t.name: "skipped (QuantConfig.skip)" for t in candidates if config.skips(t.name)}
        left |= _misfits([t for t in candidates if t.name not in left], config)
        targets = [t for t in candidates if t.name not in left]
        if not targets:
            raise ValueError("every linear layer is skipped (config.skip) or does not fit the codebook's unit; "
                             "nothing to quantize")
        covered = coverage(model, targets, left)
        _warn_untargeted(covered)
        if needs_factors and hessians is None:
            if collect_dir is None:
                tmp = tempfile.TemporaryDirectory(prefix="yaqa-hessians-")
                collect_dir = tmp.name
            collect_hessians(model, data, collect_dir, tokenizer=tokenizer, sketch=sketch, n_seqs=n_seqs,
                             seq_len=seq_len, batch_size=batch_size, progress=progress)
            hessians = collect_dir
        factors = _open(hessians) if needs_factors or (hessians is not None and config.lowrank_rank > 0) else None
        moments = input_moments or (factors if factors is not None and factors.sketch == "input" else None)
        for source in (factors, moments):
            missing = [t.name for t in targets if source is not None and t.name not in source]
            if missing:
                raise ValueError(f"{source.path} has no factors for {len(missing)} layers (first: {missing[0]}); "
                                 "collect them, or skip those layers with QuantConfig(skip=[...])")
        _check_sketch(method, factors)
        layer_factors = method.layer_factors(model, targets, factors)
        quantizer = config.make_quantizer()
        reports, finetuned, e2e = [], [], None
        bar = progress_bar(len(targets), f"quantize {config.summary()}", "layer", enabled=progress)

        def quantize_group(group: list[TargetModule]) -> None:
            for t in group:
                layer, report = _quantize_target(t, config, quantizer, layer_factors, factors, moments)
                replace_module(model, t.name, layer)
                modules[t.name] = layer.spec()
                reports.append(report)
                bar.update(1)

        tokens = prepare_tokens(data, tokenizer, n_seqs, seq_len) if finetunes else None
        original = copy.deepcopy(model).cpu() if config.finetune_e2e_epochs > 0 else None  # off the device meanwhile
        with bar:
            if config.finetune_epochs == 0:
                quantize_group(targets)
            else:
                checkpoint = None if checkpoint_dir is None else BlockCheckpoint(
                    checkpoint_dir, _fingerprint(model, tokens, _run_settings(config, factors, moments, batch_size)))
                finetuned = _quantize_finetuned(model, targets, config, tokens, batch_size, checkpoint,
                                                quantize_group, modules, reports, bar)
            if original is not None:
                bar.set_postfix_str("end-to-end KL fine-tuning")
                device = next(model.parameters()).device
                e2e = finetune_end_to_end(model, original.to(device), tokens, config.finetune_e2e_epochs,
                                          config.finetune_lr, batch_size, seed=config.seed)
                del original
    except BaseException:
        if not modules:  # nothing rounded yet: the caller's model as it was, its experts in their own module
            for name, module in fused.items():
                replace_module(model, name, module)
        raise
    finally:
        if tmp is not None:
            tmp.cleanup()
    # Experts left wholly in float go back to the architecture's module (the checkpoint layout every transformers loads)
    fuse_experts(model, names=[n for n, m in model.named_modules()
                               if isinstance(m, RoutedExperts) and not any(isinstance(x, QuantizedLinear) for x in m.modules())])
    config = replace(config, modules=modules,
                     routed_experts=[n for n, m in model.named_modules() if isinstance(m, RoutedExperts)])
    if hasattr(model, "config"):
        model.config.quantization_config = YaqaHfConfig.of(config)
        mark_quantized(model.config)
    return QuantReport(config, reports, covered, finetuned, e2e)
