"""Hessian collection: per-layer Kronecker factors ``H_O ⊗ H_I`` of the KL Hessian (Sketch A / B) or the
input second moment ``sum_t x_t^T x_t``, gathered with hooks in the forward and backward passes."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from . import ops
from .arch import TargetModule, decoder_layers, find_targets, routed_experts
from .data import prepare_tokens
from .fileio import atomic_save, atomic_write_text
from .progress import progress_bar
from .shrinkage import shrink, shrinkage_weight, token_parts

__all__ = [
    "SKETCHES",
    "TWO_SIDED_SKETCHES",
    "HessianFactors",
    "collect_hessians",
    "load_hessians",
    "sample_targets",
]

SKETCHES = ("input", "A", "B", "B-lw")
TWO_SIDED_SKETCHES = ("A", "B", "B-lw")
"""The sketches whose collections hold H_out as well as H_in."""
STAT_KEYS = ("H_in.token", "H_out.token", "H_in.cov", "H_out.cov")
"""What a 'B-lw' collection stores beside each factor: its per-token part and the per-sequence inner products
of the shrinkage estimator (:mod:`yaqa_ext.shrinkage`)."""
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------------------------
# Sampling


def _mix(*values: int) -> int:
    digest = hashlib.blake2b(b",".join(str(v).encode() for v in values), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_targets(logits: Tensor, seed: int, round_index: int, seq_ids: list[int]) -> Tensor:
    """Next tokens sampled from the model's own distribution ``softmax(logits)``, (B, T).

    Sequence ``s`` of round ``r`` always draws from a generator seeded by ``(seed, r, s)``, so the
    targets do not depend on batching, sharding across ranks, or resuming.
    """
    return _draw(_probabilities(logits), seed, round_index, seq_ids)


def _probabilities(logits: Tensor) -> Tensor:
    """``softmax(logits)`` (B, T, V), in fp32 (fp64 for fp64 logits), detached."""
    return torch.softmax(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _draw(probs: Tensor, seed: int, round_index: int, seq_ids: list[int]) -> Tensor:
    """One token per position by inversion: the first v with ``cumsum(p)_v > u``, u ~ U(0, 1) from the
    sequence's own generator (one uniform per token, where multinomial draws one per vocabulary entry)."""
    out = torch.empty(probs.shape[:2], dtype=torch.long, device=probs.device)
    for b, s in enumerate(seq_ids):
        g = torch.Generator(device=probs.device).manual_seed(_mix(seed, round_index, s))
        cdf = probs[b].cumsum(-1)
        u = torch.rand(probs.size(1), 1, generator=g, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
        out[b] = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.size(-1) - 1)
    return out


def _backward_sampled_loss(logits: Tensor, seed: int, round_index: int, seq_ids: list[int], seq_len: int) -> None:
    """Backpropagate ``sum_t CE(logits_t, target_t) / seq_len`` with targets drawn by :func:`sample_targets`,
    through its closed-form logit gradient ``(softmax - onehot) / seq_len`` (one softmax serves the draw
    and the gradient; no log-softmax pass and no second one for its backward)."""
    grad = _probabilities(logits)
    targets = _draw(grad, seed, round_index, seq_ids)
    grad.scatter_add_(-1, targets.unsqueeze(-1), torch.full_like(grad[..., :1], -1.0))
    logits.backward(grad.div_(seq_len).to(logits.dtype))


# ----------------------------------------------------------------------------------------------
# Rounds


def _round_plan(sketch: str, power_iters: int) -> list[str]:
    """The passes over the data. 'input': H_in += sum x^T x (forward only). 'B': both factors of
    Sketch B (power-iteration weights from the previous 'B' pass). 'A_out' / 'A_in': one
    half-iteration of Sketch A (ALGORITHMS.md section 3). 'B-lw' runs the passes of 'B'."""
    if sketch == "input":
        return ["input"]
    if sketch in ("B", "B-lw"):
        return ["B"] * power_iters
    return ["input"] + [("A_out", "A_in")[k % 2] for k in range(power_iters)]


def _normalised(H: Tensor) -> Tensor:
    """``H / ||H||_F^2`` in fp32: the power-iteration weight (scale is irrelevant, this keeps it ~1)."""
    return (H / H.double().norm().square().clamp_min(1e-300)).float()


# ----------------------------------------------------------------------------------------------
# Files


def _all_finite(t: Tensor) -> bool:
    """Whether every entry is finite, in one pass: a NaN or an infinity makes the fp64 sum non-finite, and
    fp32 / bf16 / fp16 entries cannot overflow it."""
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


def _checksum(tensors: dict[str, Tensor], counters: dict[str, str]) -> str:
    """sha256 of a checkpoint: its counters, and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(counters, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _read_checkpoint(path: Path, fingerprint: str, limits: dict[str, int], device: torch.device) -> tuple[dict, dict]:
    """``(counters, tensors)`` of an interrupted collection, once its fingerprint, checksum and counters
    (each ``0 <= counter < limits[name]``) hold; else an error naming the file and ``resume=False``."""
    hint = "pass resume=False (yaqa collect --no-resume) to start over"
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint:
            raise FileExistsError(f"{path} is an interrupted collection with other settings, model or data; {hint}, "
                                  "or choose another out_dir")
        tensors = load_file(str(path), device=str(device))
    except FileExistsError:
        raise
    except Exception as e:  # safetensors raises its own types for truncated or garbled files
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); the checkpoint is damaged: {hint}") from e
    counters = {k: meta.get(k, "") for k in limits}
    if meta.get("checksum") != _checksum(tensors, counters):
        raise ValueError(f"{path} fails its checksum (the file was changed or damaged after it was written); {hint}")
    if not all(v.isdigit() and int(v) < limits[k] for k, v in counters.items()):
        raise ValueError(f"{path} holds counters {counters} outside {limits} (exclusive); {hint}")
    return {k: int(v) for k, v in counters.items()}, tensors


def _layer_file(layer: int) -> str:
    return f"layer_{layer:03d}.safetensors"


# ----------------------------------------------------------------------------------------------
# Collection


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _Collector:
    """Hooks that feed the accumulation ops during one pass, and the factors they fill."""

    def __init__(self, targets: list[TargetModule], device: torch.device, dtype: torch.dtype, allow_tf32: bool,
                 stats: bool = False):
        self.targets = {t.name: t for t in targets}
        self.device, self.dtype, self.allow_tf32 = device, dtype, allow_tf32
        self.stats = stats  # Sketch B passes also accumulate the STAT_KEYS of the shrinkage estimator
        self.kind = "input"
        self.acc: dict[str, Tensor] = {}  # '<name>.H_in' / '<name>.H_out' of the current pass
        self.prev: dict[str, Tensor] = {}  # the latest finished factors
        self.weights: dict[str, Tensor] = {}  # normalised previous factors, the power-iteration weights
        self.updates: dict[str, int] = {}
        self.batch_shape = (0, 0)  # (sequences, tokens) of the forward pass in flight

    def start_round(self, kind: str, acc: dict[str, Tensor] | None = None) -> None:
        self.kind = kind
        sides = {"input": ("H_in",), "B": ("H_in", "H_out"), "A_out": ("H_out",), "A_in": ("H_in",)}[kind]
        if acc is None:
            acc = {}
            for t in self.targets.values():
                acc[f"{t.name}.tokens"] = torch.zeros((), dtype=torch.float64, device=self.device)
                for side in sides:
                    size = t.in_features if side == "H_in" else t.out_features
                    acc[f"{t.name}.{side}"] = torch.zeros(size, size, dtype=self.dtype, device=self.device)
                if kind == "input":  # sum_t |x_t|, the activation statistic of LQER
                    acc[f"{t.name}.x_abs"] = torch.zeros(t.in_features, dtype=self.dtype, device=self.device)
                if kind == "B" and self.stats:
                    for side, size in (("H_in", t.in_features), ("H_out", t.out_features)):
                        acc[f"{t.name}.{side}.token"] = torch.zeros(size, size, dtype=self.dtype, device=self.device)
                        acc[f"{t.name}.{side}.cov"] = torch.zeros((), dtype=torch.float64, device=self.device)
        self.acc = acc
        self.weights = ({k: _normalised(v) for k, v in self.prev.items() if k.endswith(("H_in", "H_out"))}
                        if kind != "input" else {})
        self.updates = dict.fromkeys(self.targets, 0)

    def finish_round(self) -> None:
        for name, count in self.updates.items():
            if count == 0 and self.targets[name].experts is None:  # an expert may see no token (its count says so)
                raise RuntimeError(
                    f"module {name} received no {'input' if self.kind == 'input' else 'gradient'} in this pass: it is "
                    "not used by the model's forward, or the gradient does not reach it"
                )
        for key, H in self.acc.items():
            if not _all_finite(H):
                raise FloatingPointError(f"the factor {key} has NaN or infinite entries (non-finite activations or gradients)")
            routed = self.targets[key.rpartition(".")[0]].experts is not None if key.endswith(("H_in", "H_out")) else True
            if not routed and not bool(H.diagonal().any()):
                warnings.warn(f"the factor {key} is zero: no {'input' if self.kind == 'input' else 'gradient'} signal "
                              "reached this module (a dead layer); quantize rounds that side to nearest", stacklevel=2)
        self.prev.update(self.acc)

    def forward_hook(self, target: TargetModule) -> Callable:
        name = target.name

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            x = inputs[0].detach()
            if self.kind == "input":
                ops.input_moment_update(x.to(self.device), self.acc[f"{name}.H_in"], self.allow_tf32)
                self.acc[f"{name}.x_abs"] += x.reshape(-1, x.shape[-1]).abs().sum(0, dtype=self.dtype).to(self.device)
                self._count(name, x)
                self.updates[name] += 1
            elif torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad:
                # Per-sequence structure (B, T or tokens routed per sequence, n), also for models that flatten
                # tokens (e.g. OPT's MLP) and for MoE experts, which see the tokens routed to them.
                self._count(name, x)
                output.register_hook(functools.partial(self._on_grad, name, x, self._slots(target, x)))

        return hook

    def _count(self, name: str, x: Tensor) -> None:
        """Add x's rows to the module's token count (absent when the pass resumed a checkpoint of a yaqa_ext that
        did not count: the collection then records no counts rather than partial ones)."""
        key = f"{name}.tokens"
        if key in self.acc:
            self.acc[key] += x.shape[:-1].numel()

    def _slots(self, target: TargetModule, x: Tensor) -> tuple[Tensor, Tensor, int] | None:
        """Where each input row of ``target`` sits among the pass's (sequence, position) slots: None for one row
        per token; for an expert, (sequence, slot, slots per sequence) of its routed rows (ascending token order)."""
        B, T = self.batch_shape
        if target.experts is None:
            if x.shape[:-1].numel() != B * T:
                raise ValueError(f"{target.name} saw inputs of shape {tuple(x.shape)} in a forward pass of {B} x {T} "
                                 "tokens; yaqa_ext needs one input row per token")
            return None
        rows, tokens = target.experts.current_rows, target.experts.current_tokens
        if rows is None or tokens != B * T:
            raise ValueError(f"{target.name}: its experts module routed {tokens} token rows in a forward pass of {B} x "
                             f"{T} tokens (or was called outside its forward); yaqa_ext needs one row per token")
        seq = torch.div(rows, T, rounding_mode="floor")
        counts = torch.bincount(seq, minlength=B)
        slot = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[seq]
        return seq, slot, int(counts.max())

    def _on_grad(self, name: str, x: Tensor, slots: tuple[Tensor, Tensor, int] | None, g: Tensor) -> None:
        """The sketch update of one module from its inputs x and output gradients g (laid out by sequence here, so
        the padded copies of an expert's routed rows exist only during its update)."""
        X = _by_sequence(x, slots, self.batch_shape).to(self.device)
        G = _by_sequence(g.detach(), slots, self.batch_shape).to(self.device)
        w = self.weights
        if self.kind == "B" and self.stats:
            self._sketch_b_with_stats(name, X, G, w.get(f"{name}.H_in"), w.get(f"{name}.H_out"))
        elif self.kind == "B":
            ops.sketch_b_update(
                X, G, self.acc[f"{name}.H_in"], self.acc[f"{name}.H_out"],
                w.get(f"{name}.H_in"), w.get(f"{name}.H_out"), self.allow_tf32,
            )
        elif self.kind == "A_out":
            ops.sketch_a_update(X, G, None, self.acc[f"{name}.H_out"], w[f"{name}.H_in"], None, self.allow_tf32)
        else:  # A_in: the weights of the previous H_out half-iteration
            ops.sketch_a_update(X, G, self.acc[f"{name}.H_in"], None, None, w[f"{name}.H_out"], self.allow_tf32)
        self.updates[name] += 1

    def _sketch_b_with_stats(self, name: str, X: Tensor, G: Tensor, P_in: Tensor | None, P_out: Tensor | None) -> None:
        """Sketch B one sequence at a time, adding each sequence's per-token part ``D_b`` and its inner product
        ``<S_b - D_b, S_b>`` (same factors as the batched update, up to summation order)."""
        for b in range(X.size(0)):
            S_in, S_out = (torch.zeros_like(self.acc[f"{name}.{side}"]) for side in ("H_in", "H_out"))
            ops.sketch_b_update(X[b : b + 1], G[b : b + 1], S_in, S_out, P_in, P_out, self.allow_tf32)
            D_in, D_out = token_parts(X[b], G[b], P_in, P_out, self.dtype, self.allow_tf32)
            for side, S, D in (("H_in", S_in, D_in), ("H_out", S_out, D_out)):
                self.acc[f"{name}.{side}"] += S
                self.acc[f"{name}.{side}.token"] += D
                self.acc[f"{name}.{side}.cov"] += ((S - D) * S).sum(dtype=torch.float64)


def _by_sequence(t: Tensor, slots: tuple[Tensor, Tensor, int] | None, batch_shape: tuple[int, int]) -> Tensor:
    """Rows of ``t`` as (sequences, slots, features): a reshape for one row per token, else each routed row in its
    sequence's slot of a zero-padded tensor (zero rows add nothing to any sketch)."""
    B, T = batch_shape
    if slots is None:
        return t.reshape(B, T, -1)
    seq, slot, width = slots
    out = t.new_zeros(B, width, t.shape[-1])
    out[seq, slot] = t.reshape(-1, t.shape[-1])
    return out


def _require_grad_hook(module: nn.Module, inputs: tuple, output):
    """Make a block's (or the embedding's) output the start of the backward graph."""
    first = output[0] if isinstance(output, tuple) else output
    if isinstance(first, Tensor) and first.is_floating_point() and not first.requires_grad:
        first.requires_grad_(True)


def _checkpointed(forward: Callable) -> Callable:
    """A block forward recomputed in the backward pass (reentrant checkpointing: the first pass runs
    without grad, so the collection hooks only act on the recomputation)."""

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # the forward-only 'input' pass has nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(functools.partial(forward, **kwargs), *args, use_reentrant=True)

    return run


def _fingerprint(model: nn.Module, tokens: Tensor, settings: dict) -> str:
    """A hash of the settings, the tokens and a sample of every parameter. Parameters sharded across ranks
    (FSDP2's DTensors) are sampled from each rank's own shard and the ranks' digests hashed together, so
    every rank gets the same fingerprint without gathering a weight."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(tokens.cpu().numpy().tobytes())
    local = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        flat = (p.to_local() if hasattr(p, "to_local") else p).detach().reshape(-1)
        local.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    digests = [local.hexdigest()]
    if _dist_info()[1] > 1:
        digests = [None] * _dist_info()[1]
        torch.distributed.all_gather_object(digests, local.hexdigest())
    for d in digests:
        h.update(d.encode())
    return h.hexdigest()


@dataclass
class _Job:
    """What every pass of a collection shares."""

    model: nn.Module
    tokens: Tensor
    batches: list[list[int]]
    plan: list[str]
    seed: int
    seq_len: int
    world: int
    checkpoint_interval: float
    gradient_checkpointing: bool
    bar: tqdm


def _run_passes(job: _Job, collector: _Collector, targets: list[TargetModule], start: tuple[int, int],
                acc: dict[str, Tensor] | None, save_state: Callable[[int, int], None]) -> None:
    """Every pass of the plan over the data for one group of targets, from (pass, batch) ``start``; the
    finished factors are left in ``collector.prev``."""
    model = job.model
    model_device = next(model.parameters()).device
    _, blocks = decoder_layers(model)
    lowest = min(t.layer for t in targets)
    start_module = model.get_input_embeddings() if lowest == 0 else blocks[lowest - 1]
    handles = [t.module.register_forward_hook(collector.forward_hook(t)) for t in targets]
    handles.append(start_module.register_forward_hook(_require_grad_hook))  # layers below run without a graph
    patched: list[nn.Module] = []
    if job.gradient_checkpointing:
        for block in list(blocks)[lowest:]:
            block.forward = _checkpointed(block.forward)
            patched.append(block)
    round_index, next_batch = start
    try:
        last_save = time.monotonic()
        while round_index < len(job.plan):
            kind = job.plan[round_index]
            collector.start_round(kind, acc)
            acc = None
            started, seen = time.monotonic(), 0
            for b in range(next_batch, len(job.batches)):
                seq_ids = job.batches[b]
                ids = job.tokens[seq_ids].to(model_device)
                collector.batch_shape = tuple(ids.shape)
                if kind == "input":
                    with torch.no_grad():
                        model(input_ids=ids, use_cache=False)
                else:
                    with torch.enable_grad():  # also when the caller runs under no_grad
                        logits = model(input_ids=ids, use_cache=False).logits
                        if not _all_finite(logits):
                            raise FloatingPointError(
                                f"non-finite logits on sequences {seq_ids[0]}..{seq_ids[-1]} of pass {round_index}: the "
                                "model overflows (fp16?) or holds NaN/inf weights"
                            )
                        _backward_sampled_loss(logits, job.seed, round_index, seq_ids, job.seq_len)
                        del logits
                seen += ids.numel()
                job.bar.update(1)
                job.bar.set_postfix(tokens_per_s=f"{seen / max(time.monotonic() - started, 1e-9):.0f}", refresh=False)
                if time.monotonic() - last_save >= job.checkpoint_interval and b + 1 < len(job.batches):
                    save_state(round_index, b + 1)
                    last_save = time.monotonic()
            if job.world > 1:
                for H in collector.acc.values():
                    torch.distributed.all_reduce(H)
            collector.finish_round()
            round_index, next_batch = round_index + 1, 0
            collector.acc = {}
            if round_index < len(job.plan):  # the last pass's factors go straight into the layer files
                save_state(round_index, 0)
            last_save = time.monotonic()
    finally:
        for h in handles:
            h.remove()
        for block in patched:
            del block.forward


def _layer_groups(targets: list[TargetModule], layers_per_pass: int | None) -> list[list[TargetModule]]:
    """The targets cut into groups of ``layers_per_pass`` consecutive selected decoder layers (one group: all)."""
    layers = sorted({t.layer for t in targets})
    size = layers_per_pass or len(layers)
    chunks = [set(layers[i : i + size]) for i in range(0, len(layers), size)]
    return [[t for t in targets if t.layer in chunk] for chunk in chunks]


def _write_layers(out: Path, targets: list[TargetModule], factors: dict[str, Tensor]) -> None:
    by_layer: dict[int, dict[str, Tensor]] = {}
    for t in targets:
        for side in ("H_in", "H_out", "x_abs", "tokens", *STAT_KEYS):
            key = f"{t.name}.{side}"
            if key in factors:
                by_layer.setdefault(t.layer, {})[key] = factors[key]
    for layer, tensors in by_layer.items():
        atomic_save(tensors, out / _layer_file(layer))


def collect_hessians(
    model: nn.Module,
    data,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    sketch: str = "B",
    power_iters: int = 1,
    n_seqs: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    layers: list[int] | None = None,
    layers_per_pass: int | None = None,
    include: str | None = None,
    exclude: str | None = None,
    accum_dtype: torch.dtype = torch.float32,
    factor_device: str | torch.device | None = None,
    seed: int = 0,
    resume: bool = True,
    checkpoint_interval: float = 600.0,
    gradient_checkpointing: bool = False,
    allow_tf32: bool = False,
    progress: bool = True,
) -> Path:
    """Collect each decoder linear layer's Kronecker factors into ``out_dir``; returns ``out_dir``.

    ``sketch="B"``: ``H_I = sum_b Gw_b^T Gw_b``, ``H_O = sum_b Gw_b Gw_b^T`` from per-sequence
    gradients (``power_iters`` passes, each later one weighted by the previous factors);
    ``"A"``: the per-token power iteration (one forward pass for ``sum x^T x``, then
    ``power_iters`` half-iterations, the first updating H_O); ``"input"``: ``sum x^T x`` only
    (the GPTQ / LDLQ Hessian); ``"B-lw"``: Sketch B plus each factor's per-token part and the
    per-sequence statistics of :mod:`yaqa_ext.shrinkage`, which :meth:`HessianFactors.load` then
    shrinks the factors with (about 10% more collection time than ``"B"`` on SmolLM2, factor files
    twice the size). Gradients come from the loss of targets sampled from the model's own output distribution.
    ``data``: see :func:`yaqa_ext.data.prepare_tokens`.

    Memory: ``layers`` selects decoder blocks; ``layers_per_pass=k`` collects them k at a time, each
    group with its own passes over the data, its factors written to disk and freed before the next
    group starts: factor memory is that of k layers, at the price of one forward and backward per
    group. ``factor_device`` accumulates the factors elsewhere than the model (e.g. ``"cpu"``).

    Progress is checkpointed atomically every ``checkpoint_interval`` seconds, at the end of each
    pass but a group's last (whose factors are written out as the result) and after each group; a
    run that is killed and started again (``resume=True``) ends with the same factors as an
    uninterrupted one. Under ``torch.distributed`` each rank takes every world_size-th sequence and
    the factors are sum-reduced (gloo for CPU factors, nccl for GPU); the model may be sharded with
    FSDP2 (``fully_shard``). The model is left as it was: hooks removed, no gradients, parameters
    untouched.

    Output: ``layer_XXX.safetensors`` with ``<module>.H_in`` (and ``<module>.H_out``) per decoder
    layer, and ``manifest.json``; read them with :func:`load_hessians`.
    """
    if sketch not in SKETCHES:
        raise ValueError(f"sketch must be one of {SKETCHES}, got {sketch!r}")
    if power_iters < 1:
        raise ValueError(f"power_iters must be >= 1, got {power_iters}")
    if sketch == "B-lw" and n_seqs < 2:
        raise ValueError(f"sketch 'B-lw' estimates its shrinkage from the spread over sequences: n_seqs must be >= 2, "
                         f"got {n_seqs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if layers_per_pass is not None and layers_per_pass < 1:
        raise ValueError(f"layers_per_pass must be >= 1 (or None: every layer in one pass), got {layers_per_pass}")
    if accum_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"accum_dtype must be torch.float32 or torch.float64, got {accum_dtype}")
    out = Path(out_dir)
    with routed_experts(model):  # fused MoE experts collected per expert, restored afterwards
        rank, world = _dist_info()
        device = torch.device(factor_device) if factor_device is not None else next(model.parameters()).device
        targets = find_targets(model, layers, include, exclude)
        tokens = prepare_tokens(data, tokenizer, n_seqs, seq_len)
        plan = _round_plan(sketch, power_iters)
        settings = {
            "sketch": sketch, "power_iters": power_iters, "n_seqs": n_seqs, "seq_len": seq_len, "batch_size": batch_size,
            "layers": sorted({t.layer for t in targets}), "modules": [t.name for t in targets], "seed": seed,
            "accum_dtype": str(accum_dtype).removeprefix("torch."), "world_size": world, "layers_per_pass": layers_per_pass,
        }
        fingerprint = _fingerprint(model, tokens, settings)
        manifest_path = out / MANIFEST
        if manifest_path.exists():
            old = json.loads(manifest_path.read_text())
            if resume and old.get("fingerprint") == fingerprint:
                return out
            if resume:
                raise FileExistsError(
                    f"{out} holds Hessians collected with other settings, model or data; pass resume=False to "
                    "overwrite them, or choose another out_dir"
                )
        out.mkdir(parents=True, exist_ok=True)
        state_path = out / f"collect-state-rank{rank}.safetensors"
        groups = _layer_groups(targets, layers_per_pass)

        group_index, round_index, next_batch, saved = 0, 0, 0, {}
        my_seqs = list(range(rank, n_seqs, world))
        batches = [my_seqs[i : i + batch_size] for i in range(0, len(my_seqs), batch_size)]
        if resume and state_path.exists():
            limits = {"group": len(groups), "round": len(plan), "next_batch": len(batches)}
            counters, saved = _read_checkpoint(state_path, fingerprint, limits, device)
            group_index, round_index, next_batch = counters["group"], counters["round"], counters["next_batch"]
        per_group = len(plan) * len(batches)
        bar = progress_bar(len(groups) * per_group, f"collect sketch {sketch}", "batch", enabled=progress and rank == 0,
                           initial=group_index * per_group + round_index * len(batches) + next_batch)
        job = _Job(model, tokens, batches, plan, seed, seq_len, world, checkpoint_interval, gradient_checkpointing, bar)
        saved_flags = [(p, p.requires_grad) for p in model.parameters()]
        was_training = model.training
        try:
            model.eval()
            for p, _ in saved_flags:
                p.requires_grad_(False)
            for g in range(group_index, len(groups)):
                collector = _Collector(groups[g], device, accum_dtype, allow_tf32, stats=sketch == "B-lw")
                collector.prev = {k.removeprefix("prev."): v for k, v in saved.items() if k.startswith("prev.")}
                acc = {k.removeprefix("acc."): v for k, v in saved.items() if k.startswith("acc.")} or None

                def save_state(r: int, b: int, g: int = g, collector: _Collector = collector) -> None:
                    tensors = {f"acc.{k}": v for k, v in collector.acc.items()} | {f"prev.{k}": v for k, v in collector.prev.items()}
                    counters = {"group": str(g), "round": str(r), "next_batch": str(b)}
                    atomic_save(tensors, state_path,
                                {"fingerprint": fingerprint, "checksum": _checksum(tensors, counters), **counters})

                _run_passes(job, collector, groups[g], (round_index, next_batch), acc, save_state)
                if rank == 0:
                    _write_layers(out, groups[g], collector.prev)
                round_index, next_batch, saved = 0, 0, {}
                if g + 1 < len(groups):  # this group's factors are on disk: the next one starts from nothing
                    collector.acc, collector.prev = {}, {}
                    save_state(0, 0, g + 1)
                del collector
        finally:
            bar.close()
            for p, flag in saved_flags:
                p.requires_grad_(flag)
                p.grad = None
            model.train(was_training)

        if rank == 0:
            manifest = {
                "format_version": FORMAT_VERSION,
                "fingerprint": fingerprint,
                "model": str(getattr(model, "name_or_path", "") or type(model).__name__),
                "passes": plan,
                "tokens": n_seqs * seq_len,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "yaqa_ext_version": _version(),
                "torch_version": torch.__version__,
                **settings,
                "module_info": {
                    t.name: {"layer": t.layer, "file": _layer_file(t.layer), "in_features": t.in_features,
                             "out_features": t.out_features, **({} if t.expert is None else {"expert": t.expert})}
                    for t in targets
                },
            }
            atomic_write_text(json.dumps(manifest, indent=2), manifest_path)
        if world > 1:
            torch.distributed.barrier()
        state_path.unlink(missing_ok=True)
        return out


def _version() -> str:
    from . import __version__

    return __version__


# ----------------------------------------------------------------------------------------------
# Reading


class HessianFactors:
    """The factors in a collection folder, loaded one module at a time."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.exists():
            raise FileNotFoundError(f"{self.path}: no {MANIFEST}; not a finished Hessian collection (run collect first)")
        try:
            self.manifest = json.loads(manifest.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{manifest} is not valid JSON ({e}); the collection is corrupt") from e
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{manifest}: format version {self.manifest.get('format_version')}, expected {FORMAT_VERSION}")

    @property
    def sketch(self) -> str:
        return self.manifest["sketch"]

    @property
    def modules(self) -> list[str]:
        return list(self.manifest["module_info"])

    def __contains__(self, name: str) -> bool:
        return name in self.manifest["module_info"]

    def tokens(self, name: str) -> int | None:
        """How many token rows reached a module in one pass over the data: ``n_seqs * seq_len``, or for an MoE
        expert's matrix the tokens routed to it (None: a collection made before yaqa_ext counted them)."""
        info = self._info(name)
        with safe_open(str(self.path / info["file"]), "pt") as f:
            key = f"{name}.tokens"
            return int(f.get_tensor(key)) if key in set(f.keys()) else None

    def expert_tokens(self) -> dict[str, int]:
        """The tokens routed to each MoE expert's matrix (module name -> count), for the experts of the collection."""
        return {name: self.tokens(name) for name, info in self.manifest["module_info"].items() if "expert" in info}

    def abs_mean(self, name: str, device: str | torch.device = "cpu") -> Tensor | None:
        """``mean_t |x_t|`` of a module's inputs (n; an MoE expert's over its routed tokens), when the collection
        had a forward-only 'input' pass."""
        info = self._info(name)
        with safe_open(str(self.path / info["file"]), "pt", device=str(device)) as f:
            key = f"{name}.x_abs"
            if key not in set(f.keys()):
                return None
            return f.get_tensor(key) / max(self.tokens(name) or self.manifest["tokens"], 1)

    def _info(self, name: str) -> dict:
        info = self.manifest["module_info"].get(name)
        if info is None:
            raise KeyError(f"{self.path} has no factors for module {name!r} (it has {len(self.modules)} modules)")
        return info

    def load(self, name: str, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor | None]:
        """``(H_in, H_out)`` of a module (``H_out`` is None for the 'input' sketch); a 'B-lw' collection's
        factors shrunk toward their per-token parts by the weights of :meth:`shrinkage`."""
        if self.sketch != "B-lw":
            H_in, H_out = self._read(name, device, ("H_in", "H_out"))
            return H_in, H_out
        (H_in, D_in, lam_in), (H_out, D_out, lam_out) = self._shrinkage_terms(name, device)
        return shrink(H_in, D_in, lam_in), shrink(H_out, D_out, lam_out)

    def shrinkage(self, name: str) -> tuple[float, float]:
        """The shrinkage weights ``(lam_in, lam_out)`` of a module of a 'B-lw' collection (0: the factor as
        collected, 1: its per-token part alone); see :func:`yaqa_ext.shrinkage.shrinkage_weight`."""
        if self.sketch != "B-lw":
            raise ValueError(f"{self.path} is a sketch {self.sketch!r} collection; shrinkage weights need one "
                             "collected with sketch='B-lw'")
        return tuple(lam for _, _, lam in self._shrinkage_terms(name, "cpu"))

    def _shrinkage_terms(self, name: str, device: str | torch.device) -> list[tuple[Tensor, Tensor, float]]:
        """``(factor, its per-token part, shrinkage weight)`` for H_in and for H_out."""
        H_in, H_out, D_in, D_out, q_in, q_out = self._read(name, device, ("H_in", "H_out", *STAT_KEYS))
        n = self.manifest["n_seqs"]
        return [(H, D, shrinkage_weight(H, D, float(q), n)) for H, D, q in ((H_in, D_in, q_in), (H_out, D_out, q_out))]

    def _read(self, name: str, device: str | torch.device, keys: tuple[str, ...]) -> list[Tensor | None]:
        """The module's tensors ``<name>.<key>``, checked (None: absent, only H_out of an 'input' collection)."""
        info = self._info(name)
        file = self.path / info["file"]
        try:
            with safe_open(str(file), "pt", device=str(device)) as f:
                tensors = {k: f.get_tensor(f"{name}.{k}") for k in keys if f"{name}.{k}" in set(f.keys())}
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{file} is missing: the collection in {self.path} is incomplete") from e
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{file} cannot be read ({e}); the collection is corrupt") from e
        missing = [k for k in keys if k not in tensors and not (k == "H_out" and self.sketch == "input")]
        if missing:
            raise ValueError(f"{file} has no {', '.join(f'{name}.{k}' for k in missing)}, which a Sketch {self.sketch} "
                             "collection writes for every module; the collection is corrupt: collect again")
        sizes = {"H_in": info["in_features"], "H_out": info["out_features"]}
        for key, H in tensors.items():
            size = sizes[key.split(".")[0]]
            expected = () if key.endswith(".cov") else (size, size)
            if tuple(H.shape) != expected:
                raise ValueError(f"{file}: {name}.{key} has shape {tuple(H.shape)}, expected {expected}; the "
                                 "collection is corrupt: collect again")
        return [tensors.get(k) for k in keys]


def load_hessians(path: str | os.PathLike) -> HessianFactors:
    """Open a folder written by :func:`collect_hessians`."""
    return HessianFactors(path)

