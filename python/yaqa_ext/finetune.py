"""Per-block fine-tuning during quantization (QuIP#-style). A decoder block's linear layers are rounded one group
at a time (layers reading the same input: q/k/v, gate/up, ...); after each group the block's float parameters
(the linears not rounded yet, norms, biases, and the rounded layers' channel scales: the RHT's signs relaxed to
continuous per-channel scales) are trained with Adam to minimise the mean squared error
``||block(X) - block_orig(X)||^2`` on the calibration activations X that reach the block through the already
quantized blocks below it, and the epoch with the lowest error on held-out sequences is kept (never worse than
before)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from .fileio import atomic_save
from .arch import TargetModule, decoder_layers
from .qlinear import QuantizedLinear

__all__ = ["BlockCheckpoint", "BlockInputs", "block_outputs", "capture_block_inputs", "finetune_block",
           "finetune_end_to_end", "kl_divergence", "linear_groups", "quantize_blocks"]


@dataclass
class BlockInputs:
    """What a decoder block is called with, batch by batch: hidden states and the keyword arguments the model
    passes every block (position embeddings, masks)."""

    hidden: list[Tensor]
    kwargs: list[dict]

    def with_hidden(self, hidden: list[Tensor]) -> BlockInputs:
        return BlockInputs(hidden, self.kwargs)


class _Stop(Exception):
    pass


def _hidden(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture_block_inputs(model: nn.Module, tokens: Tensor, batch_size: int) -> BlockInputs:
    """The inputs of the first decoder block for ``tokens`` (N, T), ``batch_size`` sequences a batch; the
    model runs only up to that block."""
    _, blocks = decoder_layers(model)
    hidden, kwargs = [], []

    def catch(module: nn.Module, args: tuple, kw: dict):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for start in range(0, tokens.size(0), batch_size):
            try:
                model(input_ids=tokens[start : start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return BlockInputs(hidden, kwargs)


@torch.no_grad()
def block_outputs(block: nn.Module, inputs: BlockInputs) -> list[Tensor]:
    """``block(x)`` for every batch of ``inputs``."""
    return [_hidden(block(x, **kw)) for x, kw in zip(inputs.hidden, inputs.kwargs)]


@torch.no_grad()
def linear_groups(block: nn.Module, inputs: BlockInputs, targets: Sequence[TargetModule]) -> list[list[TargetModule]]:
    """``targets`` (linears of this block) grouped by the input they read, in the order the block calls them:
    one forward of the first batch, each layer's input tensor identified by its storage (the inputs are held
    until the forward ends, so no storage is reused for another input)."""
    seen: dict[tuple, list[TargetModule]] = {}
    held: list[Tensor] = []
    handles = []
    for t in targets:
        def hook(module: nn.Module, args: tuple, t: TargetModule = t) -> None:
            x = args[0]
            held.append(x)
            seen.setdefault((x.data_ptr(), tuple(x.shape), x.stride()), []).append(t)
        handles.append(t.module.register_forward_pre_hook(hook))
    try:
        block(inputs.hidden[0], **inputs.kwargs[0])
    finally:
        for h in handles:
            h.remove()
    groups = list(seen.values())
    missing = [t.name for t in targets if not any(t in g for g in groups)]
    if missing:
        raise ValueError(f"{missing[0]} is not called by its decoder block's forward; it cannot be fine-tuned "
                         "through the block (quantize without finetune_epochs, or skip it)")
    return groups


def _trainable(block: nn.Module) -> list[nn.Parameter]:
    """The block's floating-point parameters (quantized layers hold buffers only, but their bias and, inside
    :func:`_trainable_scales`, their channel scales)."""
    return [p for p in block.parameters() if p.is_floating_point()]


@contextmanager
def _trainable_scales(block: nn.Module) -> Iterator[None]:
    """The channel scales (``in_scale``, ``out_scale``) of the block's quantized layers as fp32 parameters inside
    the context; stored back as fp16 buffers after (column scales kept >= 2^-14: the layer divides by them)."""
    swapped = []
    for layer in block.modules():
        if isinstance(layer, QuantizedLinear):
            for key in ("in_scale", "out_scale"):
                value = layer._buffers.get(key)
                if value is not None:
                    del layer._buffers[key]
                    layer.register_parameter(key, nn.Parameter(value.float(), requires_grad=False))
                    swapped.append((layer, key))
    try:
        yield
    finally:
        for layer, key in swapped:
            value = layer._parameters.pop(key).detach()
            low = 2**-14 if key == "in_scale" else -65504.0
            layer.register_buffer(key, value.clamp(low, 65504.0).half())


def finetune_block(block: nn.Module, inputs: BlockInputs, targets: list[Tensor], epochs: int, lr: float,
                   seed: int = 0, on_epoch: Callable[[int, float], None] | None = None) -> tuple[float, float]:
    """Train the block's float parameters and its quantized layers' channel scales for ``epochs`` passes over
    the batches (Adam, ``lr``; the last eighth of the batches, at least one, held out when there are two or
    more) to bring ``block(x)`` to ``targets``; keeps the parameters of the best held-out mean squared error.
    If no epoch lowers it (a learning rate too large for this block), trains once more at ``lr / 10``.
    Returns (error before, after; after with the scales in fp32, before they are stored in fp16)."""

    def loss(b: int) -> Tensor:
        return (_hidden(block(inputs.hidden[b], **inputs.kwargs[b])).float() - targets[b].float()).square().mean()

    with _trainable_scales(block):
        return _fit(block, _trainable(block), loss, [t.numel() for t in targets], epochs, lr, seed, on_epoch)


def kl_divergence(orig_logits: Tensor, logits: Tensor) -> Tensor:
    """Mean over tokens of ``KL(softmax(orig_logits) || softmax(logits))`` (fp32 at least), differentiable in
    ``logits``."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_p = torch.log_softmax(orig_logits.to(dtype), -1)
    return (log_p.exp() * (log_p - torch.log_softmax(logits.to(dtype), -1))).sum(-1).mean()


def finetune_end_to_end(model: nn.Module, original: nn.Module, tokens: Tensor, epochs: int, lr: float,
                        batch_size: int, seed: int = 0) -> tuple[float, float]:
    """Train a quantized model's float parameters (norms, biases, unquantized layers; not the embeddings or
    the output layer) and channel scales to minimise the mean per-token ``KL(p_original || p_model)`` on
    ``tokens`` (N, T), as :func:`finetune_block` trains a block (held-out batches, best epoch kept, one retry
    at ``lr / 10``). Returns the held-out KL (before, after)."""
    device = next(model.parameters()).device
    batches = [b.to(device) for b in tokens.split(batch_size)]
    frozen = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}

    def loss(b: int) -> Tensor:
        with torch.no_grad():
            goal = original(input_ids=batches[b], use_cache=False).logits
        return kl_divergence(goal, model(input_ids=batches[b], use_cache=False).logits)

    with _trainable_scales(model):
        params = [p for p in _trainable(model) if id(p) not in frozen]
        return _fit(model, params, loss, [b.numel() for b in batches], epochs, lr, seed)


def _fit(module: nn.Module, params: list[nn.Parameter], loss: Callable[[int], Tensor], sizes: list[int], epochs: int,
         lr: float, seed: int, on_epoch: Callable[[int, float], None] | None = None) -> tuple[float, float]:
    """:func:`_optimise` with ``module`` in eval mode (no dropout: trained as the quantized model runs) and its
    other parameters frozen, again at ``lr / 10`` if no epoch lowered the held-out loss."""
    chosen = {id(p) for p in params}
    others = [(p, p.requires_grad) for p in module.parameters() if id(p) not in chosen]
    was_training = module.training
    try:
        module.eval()
        for p, _ in others:
            p.requires_grad_(False)
        before, after = _optimise(params, loss, sizes, epochs, lr, seed, on_epoch)
        if after < before:
            return before, after
        return _optimise(params, loss, sizes, epochs, lr / 10, seed, on_epoch)
    finally:
        for p, flag in others:
            p.requires_grad_(flag)
        module.train(was_training)


def _optimise(params: list[nn.Parameter], loss: Callable[[int], Tensor], sizes: list[int], epochs: int, lr: float,
              seed: int, on_epoch: Callable[[int, float], None] | None) -> tuple[float, float]:
    """Adam on ``loss(batch)`` over the training batches for ``epochs`` (in a seeded order), the last eighth of
    the ``len(sizes)`` batches (at least one, when there are two) held out; ``params`` end at the epoch of the
    least held-out loss (the mean over held-out batches weighted by ``sizes``), the start included. Adam keeps
    fp32 master copies of bf16 / fp16 parameters (whose own precision would round small steps away).
    Returns the held-out loss (before, after)."""
    n = len(sizes)
    held = list(range(n - max(1, n // 8), n)) if n >= 2 else [0]
    train = [b for b in range(n) if b not in held] or held

    def held_loss() -> float:
        with torch.no_grad():
            return sum(float(loss(b)) * sizes[b] for b in held) / sum(sizes[b] for b in held)

    best_err = before = held_loss()
    if not params or epochs == 0:
        return before, before
    best = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    masters = [p if p.dtype in (torch.float32, torch.float64) else p.detach().float().clone() for p in params]
    optimizer = torch.optim.Adam(masters, lr=lr)
    order = random.Random(seed)
    try:
        for p in params:
            p.requires_grad_(True)
        for epoch in range(epochs):
            for b in order.sample(train, len(train)):
                with torch.enable_grad():
                    for p in params:
                        p.grad = None
                    loss(b).backward()
                _step(optimizer, params, masters)
            err = held_loss()
            if on_epoch is not None:
                on_epoch(epoch, err)
            if err < best_err:
                best_err, best = err, [p.detach().clone() for p in params]
    finally:
        with torch.no_grad():
            for p, value, flag in zip(params, best, flags):
                p.copy_(value)
                p.requires_grad_(flag)
                p.grad = None
    return before, best_err


@torch.no_grad()
def _step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], masters: list[Tensor]) -> None:
    """One optimiser step on the masters from the parameters' gradients, copied back into the parameters."""
    for p, m in zip(params, masters):
        if m is not p:
            m.grad = None if p.grad is None else p.grad.float()
    optimizer.step()
    for p, m in zip(params, masters):
        if m is not p:
            p.copy_(m)


def quantize_blocks(model: nn.Module, targets: Sequence[TargetModule], tokens: Tensor, batch_size: int, epochs: int,
                    lr: float, quantize_group: Callable[[list[TargetModule]], None],
                    progress: Callable[[str], None] | None = None, done: frozenset[int] = frozenset(),
                    on_block: Callable[[int, nn.Module, list[tuple[str, float, float]]], None] | None = None,
                    ) -> list[tuple[str, float, float]]:
    """Quantize ``targets`` block by block from the bottom, one input group at a time (``quantize_group``
    replaces the group's layers in ``model``), fine-tuning the block after each group on the activations of
    ``tokens``. Blocks in ``done`` are already quantized (restored from a checkpoint): their outputs are only
    passed on. ``on_block(index, block, log)`` runs after each block. Returns, per group, (its first layer, the
    block's held-out mean squared error before fine-tuning, after)."""
    _, blocks = decoder_layers(model)
    by_layer: dict[int, list[TargetModule]] = {}
    for t in targets:
        by_layer.setdefault(t.layer, []).append(t)
    inputs = capture_block_inputs(model, tokens, batch_size)
    log = []
    for index in range(max(by_layer) + 1):
        block = blocks[index]
        if index in by_layer and index not in done:
            goal, entries = block_outputs(block, inputs), []
            for k, group in enumerate(linear_groups(block, inputs, by_layer[index])):
                quantize_group(group)
                before, after = finetune_block(block, inputs, goal, epochs, lr, seed=index * 1000 + k)
                entries.append((group[0].name, before, after))
                if progress is not None:
                    progress(f"block {index} group {k + 1}: error {before:.3g} -> {after:.3g}")
            log += entries
            if on_block is not None:
                on_block(index, block, entries)
        if index < max(by_layer):
            inputs = inputs.with_hidden(block_outputs(block, inputs))
    return log


class BlockCheckpoint:
    """The finished blocks of a fine-tuned quantization in a folder, one ``block_XXX.safetensors`` each (the
    block's state, and in its metadata the run's fingerprint and a JSON record: the block's layer specs,
    reports and fine-tuning log), written atomically as each block ends; a run started again with the same
    fingerprint resumes after them."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str) -> None:
        self.folder, self.fingerprint = Path(folder), fingerprint

    def _file(self, index: int) -> Path:
        return self.folder / f"block_{index:03d}.safetensors"

    def save(self, index: int, block: nn.Module, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_save(block.state_dict(), self._file(index), {"fingerprint": self.fingerprint, "record": json.dumps(record)})

    def finished(self) -> list[tuple[int, dict[str, Tensor], dict]]:
        """``(block index, state, record)`` of every saved block; refuses a folder of another run."""
        out = []
        for file in sorted(self.folder.glob("block_*.safetensors")):
            try:
                with safe_open(str(file), "pt") as f:
                    meta = f.metadata() or {}
                    state = {k: f.get_tensor(k) for k in f.keys()}
            except Exception as e:  # safetensors raises its own error types for damaged files
                raise ValueError(f"{file} cannot be read ({e}); delete {self.folder} to start over") from e
            if meta.get("fingerprint") != self.fingerprint:
                raise FileExistsError(f"{self.folder} holds blocks of a run with another model, configuration, data or "
                                      "factors; delete it to start over, or choose another checkpoint folder")
            out.append((int(file.stem.removeprefix("block_")), state, json.loads(meta["record"])))
        return out
