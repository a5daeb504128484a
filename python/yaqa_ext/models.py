"""Loading causal LMs: Hugging Face hub ids or folders, and llama2.c checkpoints (converted)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .llama2c import SentencePieceTokenizer, find_llama2c_checkpoint, load_llama2c

__all__ = ["DEFAULT_MODEL", "load_model", "shared_dir"]

DEFAULT_MODEL = "stories260K"
"""The default model: ``<shared>/models/stories260K`` (a real llama2.c model, see shared_dir)."""


def shared_dir() -> Path:
    """The project's shared data folder: ``$YAQA_SHARED``, else ``../shared`` beside the repo or CWD."""
    env = os.environ.get("YAQA_SHARED")
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd().parent / "shared", Path(__file__).resolve().parents[3] / "shared"]
    for c in candidates:
        if (c / "models").is_dir():
            return c
    raise FileNotFoundError(
        "no shared data folder found (looked at " + ", ".join(str(c) for c in candidates) + "); set YAQA_SHARED"
    )


def _resolve(name_or_path: str) -> str:
    if Path(name_or_path).exists():
        return name_or_path
    try:
        local = shared_dir() / "models" / name_or_path
    except FileNotFoundError:
        return name_or_path
    return str(local) if local.exists() else name_or_path


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` for a llama2.c folder/file, a local HF folder, or a hub id.

    A bare name that matches a folder in ``<shared>/models`` is taken from there.
    """
    source = _resolve(name_or_path)
    checkpoint = find_llama2c_checkpoint(source) if Path(source).exists() else None
    if checkpoint is not None:
        model = load_llama2c(checkpoint, dtype=dtype)
        tokenizer = SentencePieceTokenizer.from_dir(checkpoint.parent)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
        tokenizer = _load_tokenizer(source)
    return model.to(device), tokenizer


def _load_tokenizer(source: str):
    """The folder's SentencePiece model when it has no Hugging Face tokenizer files, else AutoTokenizer."""
    folder = Path(source)
    if folder.is_dir() and not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        spm = sorted(folder.glob("*.model"))
        if len(spm) == 1:
            return SentencePieceTokenizer(spm[0])
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)
