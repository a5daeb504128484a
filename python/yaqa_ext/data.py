"""Calibration and evaluation text: files or folders of text, tokenised into fixed-length sequences."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["corpus_texts", "prepare_tokens", "read_texts", "token_sequences"]


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


def corpus_texts(split: str) -> list[str]:
    """The shared English corpus, split disjointly: ``"calibration"`` = State of the Union addresses
    1790-1950, ``"evaluation"`` = the addresses after 1950, then Moby-Dick."""
    from .models import shared_dir

    corpus = shared_dir() / "data" / "corpus"
    addresses = sorted((corpus / "sotu").glob("*.txt"))
    if split == "calibration":
        files = [f for f in addresses if int(f.name[:4]) <= 1950]
    elif split == "evaluation":
        files = [f for f in addresses if int(f.name[:4]) > 1950] + [corpus / "moby-dick" / "moby-dick.txt"]
    else:
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    return [f.read_text(encoding="utf-8") for f in files]


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
    return _cut(ids, n_seqs, seq_len)


def prepare_tokens(data, tokenizer, n_seqs: int, seq_len: int) -> Tensor:
    """``(n_seqs, seq_len)`` token ids from any calibration source.

    ``data`` may be token ids (a 2-D tensor whose rows are sequences, a 1-D tensor or list of ids
    cut in order, or a list of id lists, each concatenated), a list of texts, a text file or a
    folder of ``*.txt`` files, or a Hugging Face ``datasets`` dataset with an ``input_ids`` or a
    ``text`` column. Text needs ``tokenizer`` (anything with ``encode(str) -> list[int]``).
    """
    if isinstance(data, Tensor):
        if data.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"token ids must be an integer tensor, got {data.dtype}")
        if data.dim() == 2 and data.size(1) >= seq_len:
            if data.size(0) < n_seqs:
                raise ValueError(f"{data.size(0)} sequences of token ids given, {n_seqs} asked for")
            return data[:n_seqs, :seq_len].long().clone()
        return _cut(data.reshape(-1).tolist(), n_seqs, seq_len)
    column_names = getattr(data, "column_names", None)
    if column_names is not None:  # a datasets.Dataset (duck-typed: no import needed)
        if "input_ids" in column_names:
            return _cut([i for row in data["input_ids"] for i in row], n_seqs, seq_len)
        if "text" in column_names:
            return token_sequences(_need(tokenizer), data["text"], n_seqs, seq_len)
        raise ValueError(f"the dataset has neither an 'input_ids' nor a 'text' column (columns: {column_names})")
    if isinstance(data, list) and data and all(isinstance(x, int) for x in data):
        return _cut(data, n_seqs, seq_len)
    if isinstance(data, list) and data and all(isinstance(x, (list, tuple)) for x in data):
        return _cut([i for row in data for i in row], n_seqs, seq_len)
    return token_sequences(_need(tokenizer), read_texts(data), n_seqs, seq_len)


def _need(tokenizer):
    if tokenizer is None:
        raise ValueError("text data needs a tokenizer (pass tokenizer=...)")
    return tokenizer


def _cut(ids: list[int], n_seqs: int, seq_len: int) -> Tensor:
    need = n_seqs * seq_len
    if len(ids) < need:
        raise ValueError(
            f"the data holds {len(ids)} tokens, fewer than n_seqs * seq_len = {n_seqs} * {seq_len} = {need}; "
            "give more data or ask for fewer or shorter sequences"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(n_seqs, seq_len)
