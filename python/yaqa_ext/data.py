"""Calibration and evaluation text from anywhere (lists of texts or chat conversations, text files and folders,
JSON Lines, Hugging Face datasets, token ids), tokenised into fixed-length sequences."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

__all__ = ["Sample", "TextData", "corpus_texts", "prepare_tokens", "read_texts", "token_sequences"]

Sample = Union[str, list[dict[str, Any]]]
"""A text, or a chat conversation: a list of ``{"role": ..., "content": ...}`` messages."""


@dataclass(frozen=True)
class TextData:
    """Text from anywhere, with how to read it; :func:`prepare_tokens` (and so ``collect_hessians``, ``quantize``,
    ``evaluate``) takes it as ``data``.

    source: a list of texts or conversations, a text file, a folder of ``*.txt``, a JSON Lines (``.jsonl``) or JSON
    (``.json``: a list) file of records or strings, a ``datasets.Dataset``, or the name of a Hugging Face dataset
    (loaded with ``datasets.load_dataset(source, config, split=split)``; needs the ``datasets`` package).
    text_field: the records' (or dataset columns') field holding a text or a conversation. chat_template: each
    text, as a user turn, and each conversation through the tokenizer's chat template (for chat models).
    """

    source: Any
    text_field: str = "text"
    split: str = "train"
    config: str | None = None
    chat_template: bool = False

    def samples(self) -> list[Sample]:
        """The texts and conversations of the source, in order."""
        source = self.source
        if isinstance(source, (str, os.PathLike)) and Path(source).suffix in (".jsonl", ".json") and Path(source).is_file():
            return [self._field(r, f"{source}: record {i + 1}") for i, r in enumerate(_records(Path(source)))]
        if isinstance(source, str) and not Path(source).exists() and not _looks_like_path(source):
            source = _load_dataset(source, self.config, self.split)
        if getattr(source, "column_names", None) is not None:  # a datasets.Dataset (duck-typed: no import needed)
            if self.text_field not in source.column_names:
                raise ValueError(f"the dataset has no column {self.text_field!r} (columns: {source.column_names}); "
                                 "choose one with text_field (--text-field)")
            return [self._field({self.text_field: v}, f"row {i}") for i, v in enumerate(source[self.text_field])]
        if isinstance(source, list) and source and all(isinstance(x, list) for x in source):
            return [self._field({self.text_field: x}, f"item {i}") for i, x in enumerate(source)]
        return read_texts(source)

    def _field(self, record: Any, where: str) -> Sample:
        value = record if isinstance(record, str) else record.get(self.text_field) if isinstance(record, dict) else None
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value)):
            return value
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: no text or conversation in field {self.text_field!r} (it has {keys}); choose the "
                         "field with text_field (--text-field)")


def _looks_like_path(source: str) -> bool:
    """A file or folder name rather than a dataset name ('name' or 'org/name'): a text or JSON suffix, a leading
    '.', '/' or '~', or more than one '/'."""
    return (Path(source).suffix in (".txt", ".json", ".jsonl") or source.startswith((".", "/", "~"))
            or source.count("/") > 1 or "\\" in source)


def _records(path: Path) -> list[Any]:
    """The records of a JSON Lines file (one JSON value a line, blank lines skipped) or a JSON file holding a list."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            records = json.loads(text)
            if not isinstance(records, list):
                raise ValueError(f"{path}: a JSON file of calibration data must hold a list, got {type(records).__name__}")
            return records
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'JSON Lines'} ({e})") from e


def _load_dataset(name: str, config: str | None, split: str):
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{name!r} is neither a local file or folder nor loadable without the datasets package: "
                          "pip install datasets to use a Hugging Face dataset by name") from None
    return datasets.load_dataset(name, config, split=split)


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


def token_sequences(tokenizer, texts: Iterable[Sample], n_seqs: int, seq_len: int, chat_template: bool = False) -> Tensor:
    """``(n_seqs, seq_len)`` token ids: each text encoded (with BOS), or with ``chat_template`` each text (a user
    turn) and conversation through the tokenizer's chat template, concatenated, then cut in order."""
    if n_seqs < 1 or seq_len < 1:
        raise ValueError(f"n_seqs ({n_seqs}) and seq_len ({seq_len}) must be >= 1")
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template=True, but the tokenizer has no chat template (not a chat model's?)")
    need = n_seqs * seq_len
    ids: list[int] = []
    for sample in texts:
        if chat_template:
            turns = [{"role": "user", "content": sample}] if isinstance(sample, str) else sample
            ids.extend(tokenizer.apply_chat_template(turns, tokenize=True, return_dict=False))
        elif isinstance(sample, str):
            ids.extend(tokenizer.encode(sample))
        else:
            raise ValueError("the data holds chat conversations (lists of messages): pass chat_template=True "
                             "(--chat-template) to put them through the tokenizer's chat template")
        if len(ids) >= need:
            break
    return _cut(ids, n_seqs, seq_len)


def prepare_tokens(data, tokenizer, n_seqs: int, seq_len: int) -> Tensor:
    """``(n_seqs, seq_len)`` token ids from any calibration source.

    ``data`` may be token ids (a 2-D tensor whose rows are sequences, a 1-D tensor or list of ids
    cut in order, or a list of id lists, each concatenated), a Hugging Face ``datasets`` dataset with an
    ``input_ids`` column, or text: a :class:`TextData` (JSON Lines, datasets by name, chat templates, ...), or
    what its ``source`` takes, read with its defaults (a list of texts, a text file or a folder of ``*.txt``
    files, a ``.jsonl`` file of ``{"text": ...}`` records, a dataset with a ``text`` column). Text needs
    ``tokenizer`` (anything with ``encode(str) -> list[int]``; ``apply_chat_template`` for chat templates).
    """
    if isinstance(data, Tensor):
        if data.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"token ids must be an integer tensor, got {data.dtype}")
        if data.dim() == 2 and data.size(1) >= seq_len:
            if data.size(0) < n_seqs:
                raise ValueError(f"{data.size(0)} sequences of token ids given, {n_seqs} asked for")
            return data[:n_seqs, :seq_len].long().clone()
        return _cut(data.reshape(-1).tolist(), n_seqs, seq_len)
    if "input_ids" in (getattr(data, "column_names", None) or ()):  # a tokenised datasets.Dataset
        return _cut([i for row in data["input_ids"] for i in row], n_seqs, seq_len)
    if isinstance(data, list) and data and all(isinstance(x, int) for x in data):
        return _cut(data, n_seqs, seq_len)
    if isinstance(data, list) and data and all(isinstance(x, (list, tuple)) and all(isinstance(i, int) for i in x)
                                               for x in data):
        return _cut([i for row in data for i in row], n_seqs, seq_len)
    text = data if isinstance(data, TextData) else TextData(data)
    return token_sequences(_need(tokenizer), text.samples(), n_seqs, seq_len, text.chat_template)


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
