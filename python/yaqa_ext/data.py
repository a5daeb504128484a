"""Calibration and evaluation text: files or folders of text, tokenised into fixed-length sequences."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["read_texts", "token_sequences"]


def read_texts(source: str | os.PathLike | Iterable[str]) -> list[str]:
    """Texts from a file, a folder of ``*.txt`` files (sorted by name), or an iterable of strings."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if not files:
                raise FileNotFoundError(f"{path}: no *.txt files in this folder")
            return [f.read_text(encoding="utf-8") for f in files]
        if path.is_file():
            return [path.read_text(encoding="utf-8")]
        raise FileNotFoundError(f"{path}: no such file or folder")
    texts = list(source)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be strings")
    return texts


def token_sequences(tokenizer, texts: Iterable[str], n_seqs: int, seq_len: int) -> Tensor:
    """``(n_seqs, seq_len)`` token ids: each text encoded (with BOS), concatenated, then cut in order."""
    if n_seqs < 1 or seq_len < 1:
        raise ValueError(f"n_seqs ({n_seqs}) and seq_len ({seq_len}) must be >= 1")
    need = n_seqs * seq_len
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(
            f"the text holds {len(ids)} tokens, fewer than n_seqs * seq_len = {n_seqs} * {seq_len} = {need}; "
            "give more text or ask for fewer or shorter sequences"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(n_seqs, seq_len)
