"""Model loading: the llama2.c -> Hugging Face converter against llama2.c's own formulation."""

from __future__ import annotations

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
    assert tokenizer.decode(out[0].tolist()).startswith("Once upon a time, there was a little girl named Lily.")


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
