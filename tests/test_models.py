"""Model loading: the llama2.c -> Hugging Face converter against llama2.c's own formulation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from reference import llama2c_reference_logits

from yaqa_ext.llama2c import find_llama2c_checkpoint, load_llama2c, read_llama2c
from yaqa_ext.models import load_model


@pytest.fixture(scope="module")
def stories(shared):
    return shared / "models" / "stories260K"


def test_logits_match_llama2c_formulation(stories):
    model, tokenizer = load_model(str(stories))
    tokens = tokenizer.encode("Once upon a time, a little dog found a red ball in the garden.")
    with torch.no_grad():
        ours = model(torch.tensor([tokens])).logits[0].double()
    ref = llama2c_reference_logits(stories / "stories260K.bin", tokens)
    # fp32 model vs fp64 reference over 5 layers: differences are fp32 rounding (~1e-6 relative).
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_greedy_output_is_llama2c_known_output(stories):
    """stories260K's README: llama2.c's greedy output from BOS begins with this sentence."""
    model, tokenizer = load_model(str(stories))
    with torch.no_grad():
        out = model.generate(torch.tensor([[tokenizer.bos_token_id]]), max_new_tokens=20, do_sample=False)
    assert tokenizer.decode(out[0].tolist(), skip_special_tokens=True).startswith("Once upon a time, there was a little girl named Lily.")


def test_load_by_bare_name_and_dtype(stories):
    model, _ = load_model("stories260K", dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float64
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_bad_checkpoints(tmp_path, stories):
    truncated = tmp_path / "trunc.bin"
    truncated.write_bytes((stories / "stories260K.bin").read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        read_llama2c(truncated)
    assert find_llama2c_checkpoint(truncated) is None
    with pytest.raises(FileNotFoundError, match="no llama2.c checkpoint"):
        load_llama2c(tmp_path)


def _tokenizer_cases(shared) -> list[str]:
    """Edge cases of SentencePiece's normaliser (space runs, leading/trailing spaces, newlines, bytes outside the
    vocabulary), random strings over a mixed alphabet, and paragraphs of the real corpus."""
    import random

    rng = random.Random(0)
    alphabet = list("abcdeEThe  \n\t0123456789.,;!?'\"-\u2013\u00e9\u00fc\u00f1\u2211\u65e5\u672c\u0414\u0436\u03a9\U0001F600") + ["the", " of ", "  "]
    cases = ["", "a", " x", "a  b", "  Hello\n\nworld  ", "\n lead", "tab\there", "caf\u00e9 \u65e5\u672c 123"]
    cases += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(1000)]
    sotu = sorted((shared / "data" / "corpus" / "sotu").glob("*.txt"))[:5]
    return cases + [p for f in sotu for p in f.read_text(encoding="utf-8").split("\n")[:40]]


def test_llama2c_tokenizer_encodes_and_decodes_as_sentencepiece(stories, shared, tmp_path):
    """The converted tokenizer, and the tokenizer.json it saves loaded by AutoTokenizer, against the sentencepiece
    library on the same model file (BOS prepended, as llama2.c does)."""
    import sentencepiece
    from transformers import AutoTokenizer

    from yaqa_ext.llama2c import sentencepiece_tokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(stories / "tok512.model"))
    converted = sentencepiece_tokenizer(stories / "tok512.model")
    converted.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists() and not list(tmp_path.glob("*.model"))
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in _tokenizer_cases(shared):
        ids = [sp.bos_id(), *sp.encode(text)]
        for tok in (converted, reloaded):
            assert tok.encode(text) == ids, text
            assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]), text
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.unk_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())


def test_saved_quantized_llama2c_folder_has_an_autotokenizer_and_eval_needs_none(stories, tmp_path):
    """The CLI saves the llama2.c tokenizer as a transformers one; a folder saved without a tokenizer still loads
    with with_tokenizer=False, and with a tokenizer asked for says what to do."""
    from transformers import AutoTokenizer

    from yaqa_ext import QuantConfig, quantize

    model, tokenizer = load_model(str(stories))
    quantize(model, QuantConfig(method="rtn", bits=4), progress=False)
    model.save_pretrained(tmp_path / "q")
    with pytest.raises(FileNotFoundError, match="tokenizer.save_pretrained"):
        load_model(str(tmp_path / "q"))
    assert load_model(str(tmp_path / "q"), with_tokenizer=False)[1] is None
    tokenizer.save_pretrained(tmp_path / "q")
    again = AutoTokenizer.from_pretrained(tmp_path / "q")
    assert again.encode("Once upon a time") == tokenizer.encode("Once upon a time")


def test_the_library_reads_the_shared_folder_only_from_yaqa_shared(shared, monkeypatch, tmp_path):
    """Without $YAQA_SHARED the library finds no shared folder (it walks no parent folders); the command line's
    use_default_shared sets it to ../shared beside the current folder, and bare names then resolve there."""
    from yaqa_ext.data import corpus_texts
    from yaqa_ext.models import _resolve, shared_dir, use_default_shared

    monkeypatch.delenv("YAQA_SHARED")
    monkeypatch.chdir(Path(__file__).parents[1])  # the repository, beside ../shared
    for call in (shared_dir, lambda: corpus_texts("calibration")):
        with pytest.raises(FileNotFoundError, match="set YAQA_SHARED"):
            call()
    assert _resolve("stories260K") == "stories260K"  # not a local model without it: a hub id
    monkeypatch.chdir(tmp_path)  # no ../shared here: the source tree's is found
    assert use_default_shared() == shared and os.environ["YAQA_SHARED"] == str(shared)
    assert shared_dir() == Path(os.environ["YAQA_SHARED"]) and _resolve("stories260K").endswith("models/stories260K")
    monkeypatch.setenv("YAQA_SHARED", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="holds no models/ folder"):
        shared_dir()
