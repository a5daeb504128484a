"""Per-block fine-tuning (yaqa_ext.finetune): captured block inputs against the model's own hidden states, the
layer groups of known architectures, the never-worse training loop against closed-form targets, and quantize
with fine-tuning end to end (saved and reloaded)."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from conftest import tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from yaqa_ext import QuantConfig, quantize
from yaqa_ext.finetune import BlockInputs, block_outputs, capture_block_inputs, finetune_block, linear_groups
from yaqa_ext.arch import decoder_layers, find_targets

TOKENS = torch.randint(0, 64, (12, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_block_by_block_equals_the_models_hidden_states(arch):
    """Running the captured inputs through the blocks one at a time gives transformers' hidden_states."""
    model = tiny_model(arch)
    inputs = capture_block_inputs(model, TOKENS, batch_size=5)
    assert [x.size(0) for x in inputs.hidden] == [5, 5, 2]
    with torch.no_grad():
        states = model(TOKENS, output_hidden_states=True).hidden_states
    _, blocks = decoder_layers(model)
    for i in range(len(blocks) - 1):  # the last entry of hidden_states is after the final norm
        torch.testing.assert_close(torch.cat(inputs.hidden), states[i], rtol=0, atol=0)
        inputs = inputs.with_hidden(block_outputs(blocks[i], inputs))
    torch.testing.assert_close(torch.cat(inputs.hidden), states[len(blocks) - 1], rtol=0, atol=0)


@pytest.mark.parametrize("arch, expected", [
    ("llama", [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
    ("gpt2", [["c_attn"], ["attn.c_proj"], ["c_fc"], ["mlp.c_proj"]]),
])
def test_linear_groups_follow_the_shared_inputs(arch, expected):
    model = tiny_model(arch)
    _, blocks = decoder_layers(model)
    targets = [t for t in find_targets(model) if t.layer == 1]
    groups = linear_groups(blocks[1], capture_block_inputs(model, TOKENS[:2], 2), targets)
    short = {t.name: next(s for s in sum(expected, []) if t.name.endswith(s)) for t in targets}
    assert [[short[t.name] for t in g] for g in groups] == expected


class _Affine(nn.Module):
    """y = x * a + b: a block whose best parameters for targets x * a0 + b0 are a0, b0."""

    def __init__(self, d: int):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * self.a + self.b


def test_finetune_reaches_the_closed_form_optimum_and_never_gets_worse():
    g = torch.Generator().manual_seed(1)
    a0, b0 = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    hidden = [torch.randn(4, 3, 6, generator=g) for _ in range(8)]
    inputs = BlockInputs(hidden, [{} for _ in hidden])
    goal = [x * a0 + b0 for x in hidden]
    block = _Affine(6)
    before, after = finetune_block(block, inputs, goal, epochs=60, lr=0.05)
    assert before == pytest.approx(float(torch.cat([(x - y) for x, y in zip(hidden[7:], goal[7:])]).square().mean()))
    assert after < 1e-4 * before
    torch.testing.assert_close(block.a.detach(), a0, rtol=0, atol=1e-2)
    torch.testing.assert_close(block.b.detach(), b0, rtol=0, atol=1e-2)
    assert all(p.grad is None for p in block.parameters())
    # A learning rate that diverges (and so does a tenth of it, the retry): the parameters stay those of the
    # lowest held-out error, the start.
    diverging, epochs_run = _Affine(6), []
    before, after = finetune_block(diverging, inputs, goal, epochs=3, lr=1e4, on_epoch=lambda e, err: epochs_run.append(e))
    assert after == before and epochs_run == [0, 1, 2, 0, 1, 2]
    assert torch.equal(diverging.a.detach(), torch.ones(6)) and torch.equal(diverging.b.detach(), torch.zeros(6))


def test_bf16_parameters_train_through_fp32_masters():
    """A step of 1e-3 is below half of bf16's spacing near 1 (2^-8): without fp32 masters nothing would move."""
    g = torch.Generator().manual_seed(6)
    hidden = [torch.randn(4, 3, 6, generator=g).bfloat16() for _ in range(8)]
    goal = [x * 1.02 for x in hidden]
    block = _Affine(6).bfloat16()
    before, after = finetune_block(block, BlockInputs(hidden, [{} for _ in hidden]), goal, epochs=15, lr=1e-3)
    assert after < 0.5 * before and block.a.dtype == torch.bfloat16
    assert float((block.a.detach().float() - 1.02).abs().max()) < 0.01


def test_quantize_with_finetuning_lowers_the_block_error_and_round_trips(tmp_path):
    model = tiny_model("llama")
    config = QuantConfig(method="rtn", bits=2, finetune_epochs=4, finetune_lr=1e-2)
    plain, tuned = copy.deepcopy(model), copy.deepcopy(model)
    quantize(plain, QuantConfig(method="rtn", bits=2), progress=False)
    report = quantize(tuned, config, data=TOKENS, n_seqs=12, seq_len=10, batch_size=2, progress=False)
    assert len(report.finetune) == 8 and all(after <= before for _, before, after in report.finetune)
    assert any(after < before for _, before, after in report.finetune)
    assert report.config.finetune_epochs == 4 and "fine-tuned 4 epochs" in report.config.summary()
    # The first group of block 0 is rounded from the original weights (the same codes as without fine-tuning);
    # then its channel scales (the relaxed RHT signs, fp16) are trained: its weight is diag(c) W_hat diag(1/d).
    first, rounded = tuned.get_submodule("model.layers.0.self_attn.q_proj"), plain.get_submodule("model.layers.0.self_attn.q_proj")
    assert torch.equal(first.codes(), rounded.codes())
    assert first.in_scale.dtype == first.out_scale.dtype == torch.float16
    assert not torch.equal(first.out_scale, torch.ones_like(first.out_scale)), "the scales were not trained"
    expected = first.out_scale.float()[:, None] * rounded.weight / first.in_scale.float()
    torch.testing.assert_close(first.weight, expected, rtol=1e-6, atol=1e-7)  # fp32 products in another order
    extra = 16 * (16 + 16) / (16 * 16)  # two fp16 vectors on a 16 x 16 layer
    assert first.bits_per_weight() == pytest.approx(rounded.bits_per_weight() + extra)
    norm_changed = not torch.equal(tuned.model.layers[1].post_attention_layernorm.weight,
                                   model.model.layers[1].post_attention_layernorm.weight)
    assert norm_changed, "fine-tuning trained no norm"
    tuned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS[:2]).logits, tuned(TOKENS[:2]).logits)
    with pytest.raises(ValueError, match="pass data="):
        quantize(copy.deepcopy(model), config, progress=False)
    with pytest.raises(ValueError, match=r"finetune_epochs \(-1\) and .* must be >= 0"):
        QuantConfig(finetune_epochs=-1)


def test_killed_finetuned_quantization_resumes_to_the_same_model(tmp_path, monkeypatch):
    """Stopped after block 0 was written, the second run restores it (no rounding or training of its layers
    again) and ends with the uninterrupted run's model, bit for bit; another configuration is refused."""
    from yaqa_ext.finetune import BlockCheckpoint

    config = QuantConfig(method="rtn", bits=3, finetune_epochs=2, finetune_lr=1e-2)
    kw = dict(data=TOKENS, n_seqs=12, seq_len=10, batch_size=3, progress=False, checkpoint_dir=tmp_path / "state")
    original = tiny_model("llama")
    saves = []

    def stop_after_first(self, index, block, record, save=BlockCheckpoint.save):
        save(self, index, block, record)
        saves.append(index)
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(BlockCheckpoint, "save", stop_after_first)
        with pytest.raises(KeyboardInterrupt):
            quantize(copy.deepcopy(original), config, **kw)
    assert saves == [0] and (tmp_path / "state" / "block_000.safetensors").exists()
    resumed = copy.deepcopy(original)
    rounded = []
    module = importlib.import_module("yaqa_ext.quantize")
    with monkeypatch.context() as mp:
        real = module._quantize_target
        mp.setattr(module, "_quantize_target", lambda t, *a: rounded.append(t.layer) or real(t, *a))
        report = quantize(resumed, config, **kw)
    assert set(rounded) == {1}, "block 0 was rounded again"
    fresh = copy.deepcopy(original)
    expected = quantize(fresh, config, data=TOKENS, n_seqs=12, seq_len=10, batch_size=3, progress=False)
    assert [r.name for r in report.layers] == [r.name for r in expected.layers]
    assert report.finetune == expected.finetune
    for (name, a), b in zip(resumed.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(FileExistsError, match="another model, configuration"):
        quantize(copy.deepcopy(original), QuantConfig(method="rtn", bits=4, finetune_epochs=2), **kw)


def test_kl_divergence_against_its_definition():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 3, 7, generator=g, dtype=torch.float64), torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    from yaqa_ext.finetune import kl_divergence

    p, q = torch.softmax(a, -1), torch.softmax(b, -1)
    expected = (p * (p / q).log()).sum(-1).mean()
    torch.testing.assert_close(kl_divergence(a, b), expected, rtol=1e-12, atol=0)  # fp64 in, fp64 maths
    assert float(kl_divergence(a, a)) == pytest.approx(0.0, abs=1e-15)


def test_end_to_end_finetune_lowers_the_kl_to_the_original():
    """After 2-bit rounding the model's norms and channel scales trained against the original's distribution:
    the KL on held-out calibration batches goes down, and evaluate() (an independent KL) agrees on them."""
    from yaqa_ext.evaluation import evaluate

    model = tiny_model("llama")
    tokens = torch.randint(0, 64, (16, 12), generator=torch.Generator().manual_seed(5))
    plain, tuned = copy.deepcopy(model), copy.deepcopy(model)
    quantize(plain, QuantConfig(method="rtn", bits=2), progress=False)
    report = quantize(tuned, QuantConfig(method="rtn", bits=2, finetune_e2e_epochs=5, finetune_lr=1e-2),
                      data=tokens, n_seqs=16, seq_len=12, batch_size=2, progress=False)
    before, after = report.finetune_e2e
    assert after < before
    held = tokens[14:]  # the last eighth of the 8 batches of 2
    kl_plain = evaluate(model, plain, held, n_seqs=2, seq_len=12).kl
    kl_tuned = evaluate(model, tuned, held, n_seqs=2, seq_len=12).kl
    # The training loss is the plain fp32 log-softmax difference, evaluate()'s the cancellation-free form: at a
    # KL of ~4e-5 they agree to ~1e-4 relative; after training the scales are also rounded to fp16.
    assert kl_plain == pytest.approx(before, rel=1e-3) and kl_tuned == pytest.approx(after, rel=1e-2)
    assert kl_tuned < kl_plain
    scales = tuned.model.layers[0].mlp.down_proj.out_scale
    assert scales is not None and not torch.equal(scales, torch.ones_like(scales))  # trained on their own too
    assert all(torch.equal(a, b) for a, b in zip(tuned.model.embed_tokens.parameters(), model.model.embed_tokens.parameters()))
