"""Calibration data from anywhere: every input form gives the tokens of the equivalent list of strings (encoded
here one by one with the real stories260K tokenizer), chat conversations through the tokenizer's chat template
(against the template rendered by hand), and a clear error for each misuse."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

from yaqa_ext.data import TextData, prepare_tokens
from yaqa_ext.models import load_model

TEXTS = ["Once upon a time there was a little girl.", "She liked to play in the park.",
         "One day she found a big red ball under a tree.", "The end."]
N_SEQS, SEQ_LEN = 3, 12


@pytest.fixture(scope="module")
def tokenizer(shared):
    return load_model("stories260K", with_tokenizer=True)[1]


@pytest.fixture(scope="module")
def expected(tokenizer):
    """The texts encoded one by one (BOS each), concatenated and cut: the tokens every form must give."""
    ids = [i for t in TEXTS for i in tokenizer.encode(t)]
    return torch.tensor(ids[: N_SEQS * SEQ_LEN]).view(N_SEQS, SEQ_LEN)


class FakeDataset:
    """What yaqa_ext reads of a ``datasets.Dataset``: ``column_names`` and a column by name."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns
        self.column_names = list(columns)

    def __getitem__(self, key: str) -> list:
        return self.columns[key]


def forms(tmp_path):
    (tmp_path / "all.txt").write_text("".join(TEXTS))  # one file: one text (a single BOS), so compared separately
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, t in enumerate(TEXTS):
        (folder / f"{i:02d}.txt").write_text(t)
    (tmp_path / "plain.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)) + "\n\n")
    (tmp_path / "field.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in TEXTS))
    (tmp_path / "strings.json").write_text(json.dumps(TEXTS))
    return {
        "list": TEXTS,
        "folder": folder,
        "folder as str": str(folder),
        "jsonl": tmp_path / "plain.jsonl",
        "jsonl, text_field": TextData(tmp_path / "field.jsonl", text_field="body"),
        "json list of strings": tmp_path / "strings.json",
        "dataset": FakeDataset({"text": TEXTS, "label": [0] * len(TEXTS)}),
        "dataset, text_field": TextData(FakeDataset({"content": TEXTS}), text_field="content"),
        "TextData of a list": TextData(TEXTS),
    }


def test_every_form_gives_the_tokens_of_the_list_of_strings(tokenizer, expected, tmp_path):
    for name, data in forms(tmp_path).items():
        assert torch.equal(prepare_tokens(data, tokenizer, N_SEQS, SEQ_LEN), expected), name
    one_file = prepare_tokens(tmp_path / "all.txt", tokenizer, N_SEQS, SEQ_LEN)
    assert torch.equal(one_file.flatten(), torch.tensor(tokenizer.encode("".join(TEXTS))[: N_SEQS * SEQ_LEN]))
    ids = torch.cat([torch.tensor(tokenizer.encode(t)) for t in TEXTS])
    assert torch.equal(prepare_tokens(ids, None, N_SEQS, SEQ_LEN), expected)  # pre-tokenised: no tokenizer needed
    assert torch.equal(prepare_tokens(FakeDataset({"input_ids": [tokenizer.encode(t) for t in TEXTS]}), None, N_SEQS,
                                      SEQ_LEN), expected)


def test_conversations_go_through_the_chat_template(tokenizer, tmp_path):
    """Conversations (JSON Lines records' 'messages'), and plain texts as user turns, rendered by the tokenizer's
    template: the tokens of the template written out by hand, conversation after conversation."""
    chat = copy.deepcopy(tokenizer)  # the fixture's tokenizer is shared: a copy gets the template
    chat.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    talks = [[{"role": "user", "content": t}, {"role": "assistant", "content": "I see."}] for t in TEXTS]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps({"messages": m}) for m in talks))
    by_hand = [i for m in talks for i in chat.encode("".join(f"<|{x['role']}|>{x['content']}\n" for x in m),
                                                     add_special_tokens=False)]
    got = prepare_tokens(TextData(tmp_path / "chat.jsonl", text_field="messages", chat_template=True), chat, 4, 10)
    assert torch.equal(got.flatten(), torch.tensor(by_hand[:40]))
    as_user = [i for t in TEXTS for i in chat.encode(f"<|user|>{t}\n", add_special_tokens=False)]
    assert torch.equal(prepare_tokens(TextData(TEXTS, chat_template=True), chat, 2, 10).flatten(),
                       torch.tensor(as_user[:20]))
    with pytest.raises(ValueError, match="chat_template=True"):
        prepare_tokens(TextData(tmp_path / "chat.jsonl", text_field="messages"), chat, 2, 10)
    with pytest.raises(ValueError, match="no chat template"):
        prepare_tokens(TextData(TEXTS, chat_template=True), tokenizer, 2, 10)


def test_misuse_is_named(tokenizer, tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"a.jsonl: not valid JSON Lines"):
        prepare_tokens(tmp_path / "a.jsonl", tokenizer, 1, 4)
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match=r"record 1: no text or conversation in field 'text' \(it has \['body'\]\)"):
        prepare_tokens(tmp_path / "b.jsonl", tokenizer, 1, 4)
    (tmp_path / "c.json").write_text(json.dumps({"text": "x"}))
    with pytest.raises(ValueError, match="must hold a list"):
        prepare_tokens(tmp_path / "c.json", tokenizer, 1, 4)
    with pytest.raises(ValueError, match="no column 'body'"):
        prepare_tokens(TextData(FakeDataset({"text": TEXTS}), text_field="body"), tokenizer, 1, 4)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare_tokens("missing.txt", tokenizer, 1, 4)
    with pytest.raises(ValueError, match="fewer than n_seqs"):
        prepare_tokens(TEXTS, tokenizer, 100, 100)


def test_a_dataset_name_needs_the_datasets_package(tokenizer):
    """A name that is no local path is a Hugging Face dataset; without the datasets package it is refused with the
    install hint."""
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed: loading a dataset by name would need the network")
    with pytest.raises(ImportError, match="pip install datasets"):
        prepare_tokens(TextData("wikitext", config="wikitext-2-raw-v1", split="train"), tokenizer, 1, 4)
