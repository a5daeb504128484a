"""SmolLM2-135M-Instruct, the model our quality and speed claims are made on: loading from GGUF against its
README's known outputs, and the whole pipeline on a few of its layers (slow: ~1 minute to convert the GGUF
file on first use, then seconds per load)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from yaqa_ext import QuantConfig, QuantizedLinear, collect_hessians, dequantize, evaluate, quantize
from yaqa_ext.data import corpus_texts, prepare_tokens
from yaqa_ext.models import find_gguf, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(shared):
    return load_model("smollm2-135m")


def test_known_outputs(smollm2):
    """The model README's greedy continuations (fp32, CPU), plain and through the chat template."""
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    ids = torch.tensor([tok.encode("The capital of France is")])
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.size(1):]).startswith(" Paris.")
    chat = [{"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by Hugging Face"},
            {"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    out = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0, prompt.size(1):], skip_special_tokens=True) == "The capital of France is Paris."


def test_gguf_file_folder_and_name_load_the_same_weights(smollm2, shared):
    model, tok = smollm2
    gguf = find_gguf(shared / "models" / "smollm2-135m")
    assert gguf is not None and gguf.suffix == ".gguf"
    again, tok2 = load_model(str(gguf), dtype=torch.bfloat16)  # the file itself; another dtype
    assert next(again.parameters()).dtype == torch.bfloat16
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), name
    assert tok2.encode("Call me Ishmael.") == tok.encode("Call me Ishmael.")
    assert model.name_or_path == str(gguf)


def test_pipeline_on_two_layers(smollm2, tmp_path):
    """Sketch B on decoder layers 0 and 1 (32 x 128 tokens), YAQA at 4 bits on those layers only, evaluated
    against the original: every targeted linear is quantized, the others untouched, and the KL, averaged over
    three RHT seeds, is clearly below that of round-to-nearest on the same layers (the independent baseline)."""
    model, tok = smollm2
    calib = prepare_tokens(corpus_texts("calibration"), tok, 32, 128)
    collect_hessians(model, calib, tmp_path / "h", sketch="B", n_seqs=32, seq_len=128, batch_size=8, layers=[0, 1],
                     progress=False)
    skip = [r"layers\.([2-9]|[12][0-9])\."]
    evaluation = prepare_tokens(corpus_texts("evaluation"), tok, 16, 256)
    kl = {"rtn": [], "yaqa": []}
    for method, seed in itertools.product(kl, range(3)):
        q = copy.deepcopy(model)
        report = quantize(q, QuantConfig(method=method, bits=4, skip=skip, seed=seed), hessians=tmp_path / "h",
                          progress=False)
        assert len(report.layers) == 14 and 4 < report.bits_per_weight < 4.2
        assert sum(isinstance(m, QuantizedLinear) for m in q.modules()) == 14
        result = evaluate(model, dequantize(q), evaluation, n_seqs=16, seq_len=256, batch_size=8)
        assert abs(result.ppl_quant / result.ppl_orig - 1) < 0.05, result
        kl[method].append(result.kl)
    for r in report.layers:  # two-sided rounding keeps the layer's proxy error well below the weights' own
        assert 0 < r.proxy_two_sided < 0.05, r
    # Measured (2026-12-04, CPU), seeds 0, 1, 2: KL 0.0160 / 0.0133 / 0.0147 (yaqa) against 0.0194 / 0.0240 /
    # 0.0261 (rtn). One seed is not enough: roundings of equal proxy differ in KL by ~20% (seed 0 alone gives
    # 0.82x). With 4 sequences Sketch B is too noisy to beat round to nearest: the factors need data (issue 11).
    assert 0 < sum(kl["yaqa"]) < 0.8 * sum(kl["rtn"]), kl
