"""Hessian collection against brute force: explicit per-sequence weight gradients (torch.func),
per-token outer products, sum x^T x; six architectures; distributed and kill-and-resume runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_ARCHS, tiny_family, tiny_model

from yaqa_ext.arch import find_targets
from yaqa_ext.hessians import collect_hessians, load_hessians, sample_targets

N_SEQS, SEQ_LEN = 5, 7


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (N_SEQS, SEQ_LEN), generator=torch.Generator().manual_seed(0))


def weight_of(module: torch.nn.Module) -> torch.Tensor:
    """The (out, in) matrix of a Linear or a Conv1D (stored in x out)."""
    return module.weight if isinstance(module, torch.nn.Linear) else module.weight.T


def per_sequence_gradients(model, tokens, seed=0, round_index=0):
    """{module: [Gw_s for every sequence s]} from torch.func.grad of each sequence's loss on its own."""
    targets = find_targets(model)
    names = {t.name: f"{t.name}.weight" for t in targets}
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = {t.name: [] for t in targets}
    for s in range(tokens.size(0)):
        ids = tokens[s : s + 1]
        with torch.no_grad():
            target = sample_targets(model(ids).logits, seed, round_index, [s])

        def loss_fn(weights):
            logits = torch.func.functional_call(model, {**params, **weights}, (ids,)).logits
            return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum") / ids.size(1)

        grads = torch.func.grad(loss_fn)({names[n]: params[names[n]] for n in names})
        for t in targets:
            g = grads[names[t.name]]
            out[t.name].append(g if isinstance(t.module, torch.nn.Linear) else g.T)
    return out


def per_token_activations(model, tokens, seed, round_index):
    """{module: (X, G)} per token, from hooks written here: inputs and output gradients."""
    targets = find_targets(model)
    store, handles = {}, []
    for t in targets:
        def hook(mod, inp, out, name=t.name):
            out.retain_grad()
            store[name] = (inp[0].detach(), out)
        handles.append(t.module.register_forward_hook(hook))
    emb = model.get_input_embeddings()
    emb.weight.requires_grad_(True)
    logits = model(tokens).logits
    target = sample_targets(logits, seed, round_index, list(range(tokens.size(0))))
    (F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum") / tokens.size(1)).backward()
    for h in handles:
        h.remove()
    emb.weight.requires_grad_(False)
    emb.weight.grad = None
    return {n: (x.reshape(-1, x.shape[-1]).double(), o.grad.reshape(-1, o.shape[-1]).double()) for n, (x, o) in store.items()}


def assert_factor_close(actual, expected):
    # Products are computed in fp32 by the ops: ~1e-6 relative; 1e-4 of the largest entry leaves room.
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-4, atol=1e-4 * scale)


def test_sampled_targets_follow_the_model_distribution():
    """Draws by inversion have the softmax's frequencies (a chi-square bound) and do not depend on batching."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 6, 5, generator=g) * 2
    logits[0, :, 3] = -float("inf")  # a token of probability 0 is never drawn
    p = torch.softmax(logits[0].double(), -1)
    draws = 4000
    counts = torch.zeros(6, 5, dtype=torch.float64)
    for r in range(draws):
        t = sample_targets(logits, seed=0, round_index=r, seq_ids=[0])[0]
        counts[torch.arange(6), t] += 1
    assert counts[:, 3].sum() == 0
    live = p > 0
    chi2 = float(((counts - draws * p)[live] ** 2 / (draws * p[live])).sum())
    # 24 cells, 18 degrees of freedom (6 rows x 3): P(chi2 > 42.3) = 0.001 for a correct sampler.
    assert chi2 < 42.3, chi2
    batch = torch.randn(3, 6, 5, generator=g)
    together = sample_targets(batch, 7, 1, [10, 11, 12])
    alone = torch.cat([sample_targets(batch[i : i + 1], 7, 1, [10 + i]) for i in range(3)])
    assert torch.equal(together, alone)


def test_sketch_b_equals_per_sequence_gradient_sums(tmp_path, tokens):
    model = tiny_model("llama", torch.float64)
    collect_hessians(model, tokens, tmp_path, sketch="B", n_seqs=N_SEQS, seq_len=SEQ_LEN, batch_size=2,
                     accum_dtype=torch.float64, progress=False)
    h = load_hessians(tmp_path)
    grads = per_sequence_gradients(model, tokens)
    assert sorted(h.modules) == sorted(grads)
    for name, gws in grads.items():
        H_in, H_out = h.load(name)
        assert_factor_close(H_in, sum(g.T @ g for g in gws))
        assert_factor_close(H_out, sum(g @ g.T for g in gws))


def test_sketch_b_power_iteration_round(tmp_path, tokens):
    """Second pass: H_in = sum Gw^T P_out Gw, H_out = sum Gw P_in Gw^T with P = H / ||H||_F^2 of pass one."""
    model = tiny_model("llama", torch.float64)
    collect_hessians(model, tokens, tmp_path, sketch="B", power_iters=2, n_seqs=N_SEQS, seq_len=SEQ_LEN,
                     batch_size=3, accum_dtype=torch.float64, progress=False)
    h = load_hessians(tmp_path)
    first, second = per_sequence_gradients(model, tokens, round_index=0), per_sequence_gradients(model, tokens, round_index=1)
    for name in list(first)[:4]:
        P_in = sum(g.T @ g for g in first[name])
        P_out = sum(g @ g.T for g in first[name])
        P_in, P_out = P_in / P_in.norm() ** 2, P_out / P_out.norm() ** 2
        H_in, H_out = h.load(name)
        assert_factor_close(H_in, sum(g.T @ P_out @ g for g in second[name]))
        assert_factor_close(H_out, sum(g @ P_in @ g.T for g in second[name]))


def test_sketch_a_equals_per_token_formula(tmp_path, tokens):
    model = tiny_model("qwen2", torch.float64)
    collect_hessians(model, tokens, tmp_path, sketch="A", power_iters=2, n_seqs=N_SEQS, seq_len=SEQ_LEN,
                     batch_size=2, accum_dtype=torch.float64, progress=False)
    h = load_hessians(tmp_path)
    assert h.manifest["passes"] == ["input", "A_out", "A_in"]
    pass1, pass2 = per_token_activations(model, tokens, 0, 1), per_token_activations(model, tokens, 0, 2)
    for name in list(pass1)[:5]:
        x1, g1 = pass1[name]
        x2, g2 = pass2[name]
        H_in0 = x1.T @ x1  # pass 0: the input moment (same inputs every pass)
        P_in = H_in0 / H_in0.norm() ** 2
        H_out1 = torch.einsum("t,ti,tj->ij", torch.einsum("ti,ij,tj->t", x1, P_in, x1), g1, g1)
        P_out = H_out1 / H_out1.norm() ** 2
        H_in2 = torch.einsum("t,ti,tj->ij", torch.einsum("ti,ij,tj->t", g2, P_out, g2), x2, x2)
        H_in, H_out = h.load(name)
        assert_factor_close(H_out, H_out1)
        assert_factor_close(H_in, H_in2)


def test_input_sketch_is_sum_xtx(tmp_path, tokens):
    model = tiny_model("opt")
    collect_hessians(model, tokens, tmp_path, sketch="input", n_seqs=N_SEQS, seq_len=SEQ_LEN, batch_size=4,
                     progress=False)
    h = load_hessians(tmp_path)
    acts = {}
    handles = [t.module.register_forward_hook(lambda m, i, o, n=t.name: acts.__setitem__(n, i[0].detach()))
               for t in find_targets(model)]
    with torch.no_grad():
        model(tokens)
    for hd in handles:
        hd.remove()
    for name, x in acts.items():
        x = x.reshape(-1, x.shape[-1]).double()
        H_in, H_out = h.load(name)
        assert H_out is None
        assert_factor_close(H_in, x.T @ x)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_architecture_and_model_left_unchanged(tmp_path, tokens, arch):
    model = tiny_model(arch)
    params_before, flags_before = snapshot(model)
    with torch.no_grad():
        logits_before = model(tokens).logits
    collect_hessians(model, tokens, tmp_path, sketch="B", n_seqs=N_SEQS, seq_len=SEQ_LEN, batch_size=2, progress=False)
    h = load_hessians(tmp_path)
    targets = find_targets(model)
    assert sorted(h.modules) == sorted(t.name for t in targets)
    for t in targets:
        H_in, H_out = h.load(t.name)
        assert H_in.shape == (t.in_features,) * 2 and H_out.shape == (t.out_features,) * 2
        for H in (H_in, H_out):
            assert torch.isfinite(H).all() and torch.equal(H, H.T)
            assert torch.linalg.eigvalsh(H.double()).min() >= -1e-5 * H.diagonal().sum()  # PSD up to fp32 noise
            assert H.diagonal().sum() > 0
    params_after, flags_after = snapshot(model)
    assert all(torch.equal(params_before[k], params_after[k]) for k in params_before)
    assert flags_after == flags_before
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, logits_before)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_activation_checkpointing_gives_the_same_factors(tmp_path, tokens, arch):
    model = tiny_model(arch)
    kw = dict(sketch="B", n_seqs=N_SEQS, seq_len=SEQ_LEN, batch_size=2, progress=False)
    collect_hessians(model, tokens, tmp_path / "plain", **kw)
    collect_hessians(model, tokens, tmp_path / "ckpt", gradient_checkpointing=True, **kw)
    a, b = load_hessians(tmp_path / "plain"), load_hessians(tmp_path / "ckpt")
    for name in a.modules:
        for x, y in zip(a.load(name), b.load(name)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)  # recomputation replays the same fp32 ops
    assert all(not hasattr(m, "__dict__") or "forward" not in m.__dict__ for m in model.modules())


def test_layer_subset_and_patterns(tmp_path, tokens):
    model = tiny_model("llama")
    collect_hessians(model, tokens, tmp_path, sketch="B", n_seqs=N_SEQS, seq_len=SEQ_LEN, layers=[1],
                     exclude=r"k_proj", progress=False)
    h = load_hessians(tmp_path)
    assert h.manifest["layers"] == [1]
    assert all(".layers.1." in n and "k_proj" not in n for n in h.modules) and len(h.modules) == 6
    full = tmp_path / "full"
    collect_hessians(model, tokens, full, sketch="B", n_seqs=N_SEQS, seq_len=SEQ_LEN, progress=False)
    for name in h.modules:  # a subset gives the same factors as the full run
        torch.testing.assert_close(h.load(name)[0], load_hessians(full).load(name)[0], rtol=1e-5, atol=1e-6)


def test_layers_per_pass_gives_the_same_factors_holding_one_group(tmp_path, tokens, monkeypatch):
    """Collected one decoder layer at a time: the same factors as in one pass, and no pass ever holds an
    accumulator of another layer's module."""
    from yaqa_ext import hessians

    held: list[set[int]] = []
    start_round = hessians._Collector.start_round

    def recording(self, kind, acc=None):
        start_round(self, kind, acc)
        held.append({int(k.split(".layers.")[1].split(".")[0]) for k in self.acc})

    model = tiny_model("llama")
    kw = dict(sketch="A", power_iters=2, n_seqs=N_SEQS, seq_len=SEQ_LEN, batch_size=2, progress=False)
    collect_hessians(model, tokens, tmp_path / "one", **kw)
    monkeypatch.setattr(hessians._Collector, "start_round", recording)
    collect_hessians(model, tokens, tmp_path / "per-layer", layers_per_pass=1, **kw)
    assert held == [{0}] * 3 + [{1}] * 3  # Sketch A: input pass and two half-iterations, per layer
    one, per_layer = load_hessians(tmp_path / "one"), load_hessians(tmp_path / "per-layer")
    assert per_layer.modules == one.modules and per_layer.manifest["layers_per_pass"] == 1
    for name in one.modules:
        for x, y in zip(one.load(name), per_layer.load(name)):
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7 * float(x.abs().max()))
    with pytest.raises(ValueError, match="layers_per_pass must be >= 1"):
        collect_hessians(model, tokens, tmp_path / "bad", layers_per_pass=0, **kw)


def test_real_model_stories260k_with_text(tmp_path, shared):
    from yaqa_ext.models import load_model

    model, tokenizer = load_model(str(shared / "models" / "stories260K"))
    corpus = shared / "data" / "corpus" / "sotu"
    collect_hessians(model, corpus, tmp_path, tokenizer=tokenizer, sketch="B", n_seqs=8, seq_len=64, batch_size=4,
                     progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["tokens"] == 8 * 64 and manifest["sketch"] == "B" and len(manifest["module_info"]) == 35
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"layer_{i:03d}.safetensors" for i in range(5)] + ["manifest.json"]
    H_in, H_out = load_hessians(tmp_path).load("model.layers.4.mlp.down_proj")
    assert H_in.shape == (172, 172) and H_out.shape == (64, 64)


_DIST_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from conftest import tiny_family, tiny_model
    from yaqa_ext.arch import unfuse_experts
    from yaqa_ext.hessians import collect_hessians
    rank, world, init, out, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    fsdp, moe = mode.startswith("fsdp"), mode.endswith("moe")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    tokens = torch.randint(0, 64, (6, 7), generator=torch.Generator().manual_seed(0))

    def shard(model):  # FSDP2: every decoder block and the root sharded across the ranks (each holds half a weight)
        from torch.distributed.fsdp import fully_shard
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)

    model = tiny_family("mixtral") if moe else tiny_model("llama")
    if moe:  # experts sharded in their fused form cannot be unfused: refused, with the order that works
        shard(early := tiny_family("mixtral"))
        try:
            unfuse_experts(early)
            raise SystemExit("sharded fused experts were unfused")
        except ValueError as e:
            assert "unfuse them first, then shard" in str(e), e
        unfuse_experts(model)
    if fsdp:
        shard(model)
        assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "DTensor"
    collect_hessians(model, tokens, out, sketch="B", power_iters=2, n_seqs=6, seq_len=7, batch_size=2,
                     layers_per_pass=1 if fsdp else None, progress=False)
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("mode", ["replicated", "fsdp", "fsdp-moe"])
def test_two_gloo_processes_equal_one(tmp_path, mode):
    """Two ranks on CPU (gloo), each with a full copy of the model or with FSDP2-sharded weights (then also one
    layer per pass; an MoE model's experts unfused before sharding), give the factors of one process."""
    script = tmp_path / "dist.py"
    script.write_text(_DIST_SCRIPT.format(tests=str(Path(__file__).parent)))
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", init, str(tmp_path / "two"), mode])
             for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    tokens = torch.randint(0, 64, (6, 7), generator=torch.Generator().manual_seed(0))
    collect_hessians(tiny_family("mixtral") if mode.endswith("moe") else tiny_model("llama"), tokens, tmp_path / "one", sketch="B", power_iters=2, n_seqs=6, seq_len=7,
                     batch_size=2, progress=False)
    one, two = load_hessians(tmp_path / "one"), load_hessians(tmp_path / "two")
    assert two.manifest["world_size"] == 2
    for name in one.modules:
        for x, y in zip(one.load(name), two.load(name)):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))  # same sums, other order


_SLOW_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_model
    from yaqa_ext.hessians import collect_hessians
    model = tiny_model("llama")
    forward = model.forward
    def slow_forward(*a, **k):
        time.sleep(0.15)
        return forward(*a, **k)
    model.forward = slow_forward
    tokens = torch.randint(0, 64, (24, 7), generator=torch.Generator().manual_seed(0))
    per_pass = None if sys.argv[2] == "None" else int(sys.argv[2])
    collect_hessians(model, tokens, sys.argv[1], sketch="B", power_iters=2, n_seqs=24, seq_len=7, batch_size=2,
                     layers_per_pass=per_pass, checkpoint_interval=0.0, progress=False)
""")


@pytest.mark.parametrize("layers_per_pass", [None, 1])
def test_killed_run_resumes_to_the_same_factors(tmp_path, layers_per_pass):
    """Killed mid-way through the second pass (of the second group of layers when collected one layer at a time)."""
    out = tmp_path / "killed"
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_SCRIPT.format(tests=str(Path(__file__).parent)))
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(layers_per_pass)])
    kill_group = "0" if layers_per_pass is None else "1"
    state = out / "collect-state-rank0.safetensors"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists():
            from safetensors import safe_open

            try:
                with safe_open(str(state), "pt") as f:
                    meta = f.metadata()
            except Exception:
                meta = {}
            if meta.get("group") == kill_group and meta.get("round") == "1" and int(meta.get("next_batch", 0)) >= 3:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"

    tokens = torch.randint(0, 64, (24, 7), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama")
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    kw = dict(sketch="B", power_iters=2, n_seqs=24, seq_len=7, batch_size=2, progress=False)
    collect_hessians(model, tokens, out, layers_per_pass=layers_per_pass, **kw)
    assert len(calls) < 2 * 12, "the restarted run did not resume: it redid every batch"
    assert not state.exists()
    collect_hessians(tiny_model("llama"), tokens, tmp_path / "uninterrupted", **kw)
    a, b = load_hessians(out), load_hessians(tmp_path / "uninterrupted")
    for name in a.modules:
        for x, y in zip(a.load(name), b.load(name)):
            assert torch.equal(x, y)  # the same batches accumulated in the same order


def test_finished_collection_is_reused_and_other_settings_refused(tmp_path, tokens):
    model = tiny_model("llama")
    kw = dict(sketch="input", n_seqs=N_SEQS, seq_len=SEQ_LEN, progress=False)
    collect_hessians(model, tokens, tmp_path, **kw)
    stamp = (tmp_path / "manifest.json").stat().st_mtime_ns
    collect_hessians(model, tokens, tmp_path, **kw)
    assert (tmp_path / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="other settings, model or data; pass resume=False"):
        collect_hessians(model, tokens, tmp_path, **{**kw, "seed": 1})
    collect_hessians(model, tokens, tmp_path, resume=False, **{**kw, "seed": 1})
    assert json.loads((tmp_path / "manifest.json").read_text())["seed"] == 1


def test_errors(tmp_path, tokens):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="sketch must be one of"):
        collect_hessians(model, tokens, tmp_path, sketch="C")
    with pytest.raises(ValueError, match=r"fewer than n_seqs \* seq_len = 10 \* 7 = 70"):
        collect_hessians(model, tokens.flatten()[:60], tmp_path, n_seqs=10, seq_len=7)
    with pytest.raises(ValueError, match="text data needs a tokenizer"):
        collect_hessians(model, ["some text"], tmp_path, n_seqs=1, seq_len=4)
    with pytest.raises(ValueError, match=r"layers \[5\] out of range: the model has 2 decoder layers"):
        collect_hessians(model, tokens, tmp_path, layers=[5], n_seqs=N_SEQS, seq_len=SEQ_LEN)
    with pytest.raises(ValueError, match="no supported linear layer"):
        collect_hessians(torch.nn.Sequential(torch.nn.Embedding(4, 4)), tokens, tmp_path, n_seqs=N_SEQS, seq_len=SEQ_LEN)
    broken = tiny_model("llama")
    with torch.no_grad():
        broken.model.layers[0].mlp.up_proj.weight.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        collect_hessians(broken, tokens, tmp_path / "nan", n_seqs=N_SEQS, seq_len=SEQ_LEN, progress=False)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_hessians(tmp_path / "nan")
    with pytest.raises(KeyError, match="no factors for module 'nope'"):
        collect_hessians(model, tokens, tmp_path / "ok", sketch="input", n_seqs=N_SEQS, seq_len=SEQ_LEN, progress=False)
        load_hessians(tmp_path / "ok").load("nope")


def test_corrupt_files_give_clear_errors(tmp_path, tokens):
    collect_hessians(tiny_model("llama"), tokens, tmp_path, sketch="input", n_seqs=N_SEQS, seq_len=SEQ_LEN,
                     progress=False)
    h = load_hessians(tmp_path)
    (tmp_path / "layer_001.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be read .* corrupt"):
        h.load("model.layers.1.mlp.down_proj")
    os.remove(tmp_path / "layer_000.safetensors")
    with pytest.raises(FileNotFoundError, match="is missing"):
        h.load("model.layers.0.mlp.down_proj")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_hessians(tmp_path)


def _interrupted_collection(out, tokens, calls_before_error: int = 8):
    """A Sketch B collection stopped by an error after a few batches, its checkpoint left in ``out``."""
    model = tiny_model("llama")
    calls = []

    def fail(*_):
        calls.append(1)
        if len(calls) == calls_before_error:
            raise KeyboardInterrupt

    handle = model.register_forward_hook(fail)
    with pytest.raises(KeyboardInterrupt):
        collect_hessians(model, tokens, out, sketch="B", power_iters=2, n_seqs=N_SEQS, seq_len=SEQ_LEN, batch_size=1,
                         checkpoint_interval=0.0, progress=False)
    handle.remove()
    return model


@pytest.mark.parametrize("tamper", ["garbage", "huge_value", "next_batch", "round", "dropped", "truncated",
                                    "out_of_range"])
def test_damaged_checkpoint_is_refused(tmp_path, tokens, tamper):
    """Damaged or edited checkpoints used to resume with exit 0 and factors off by up to 99%."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from yaqa_ext.hessians import _checksum

    model = _interrupted_collection(tmp_path, tokens)
    state = tmp_path / "collect-state-rank0.safetensors"
    with safe_open(str(state), "pt") as f:
        meta = f.metadata()
    tensors = load_file(state)
    raw = bytearray(state.read_bytes())
    if tamper == "garbage":  # 1% of the data bytes, at the end of the file (the tensors, not the header)
        n = len(raw) // 100
        raw[-n:] = os.urandom(n)
        state.write_bytes(bytes(raw))
    elif tamper == "truncated":
        state.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        if tamper == "huge_value":
            next(v for k, v in sorted(tensors.items()) if k.startswith("acc."))[0, 0] = 1e30
        elif tamper == "dropped":
            del tensors[next(k for k in sorted(tensors) if k.startswith("acc."))]
        elif tamper in ("next_batch", "round"):
            meta[tamper] = str((int(meta[tamper]) + 1) % 2)
        else:  # a consistent checksum over counters no run writes: the range check catches them
            counters = {"group": "0", "round": "0", "next_batch": str(N_SEQS)}
            meta = {**meta, **counters, "checksum": _checksum(tensors, counters)}
        save_file(tensors, state, metadata=meta)
    expected = {"truncated": "cannot be read", "out_of_range": "outside"}.get(tamper, "fails its checksum")
    with pytest.raises(ValueError, match=f"{expected}.*resume=False"):
        collect_hessians(model, tokens, tmp_path, sketch="B", power_iters=2, n_seqs=N_SEQS, seq_len=SEQ_LEN,
                         batch_size=1, progress=False)


def test_checkpoint_resumes_to_the_same_factors(tmp_path, tokens):
    """The untampered checkpoint of the test above resumes to an uninterrupted run's factors, bit for bit."""
    kw = dict(sketch="B", power_iters=2, n_seqs=N_SEQS, seq_len=SEQ_LEN, batch_size=1, progress=False)
    model = _interrupted_collection(tmp_path / "a", tokens)
    collect_hessians(model, tokens, tmp_path / "a", **kw)
    collect_hessians(tiny_model("llama"), tokens, tmp_path / "b", **kw)
    a, b = load_hessians(tmp_path / "a"), load_hessians(tmp_path / "b")
    for name in a.modules:
        for x, y in zip(a.load(name), b.load(name)):
            assert torch.equal(x, y)


@pytest.mark.parametrize("tamper", ["small_H_out", "no_H_out"])
def test_factor_file_with_a_wrong_or_missing_H_out_is_refused(tmp_path, tokens, tamper):
    """A (1, 1) H_out used to broadcast; a missing one silently made YAQA one-sided."""
    from safetensors.torch import load_file, save_file

    collect_hessians(tiny_model("llama"), tokens, tmp_path, sketch="B", n_seqs=N_SEQS, seq_len=SEQ_LEN, progress=False)
    name, file = "model.layers.0.mlp.down_proj", tmp_path / "layer_000.safetensors"
    tensors = load_file(file)
    if tamper == "small_H_out":
        tensors[f"{name}.H_out"] = torch.ones(1, 1)
    else:
        del tensors[f"{name}.H_out"]
    save_file(tensors, file)
    match = r"H_out has shape \(1, 1\), expected \(\d+, \d+\)" if tamper == "small_H_out" else "has no .*H_out"
    with pytest.raises(ValueError, match=match):
        load_hessians(tmp_path).load(name)


def test_checkpoint_of_a_version_without_token_counts_resumes(tmp_path, tokens):
    """A checkpoint written before collections counted tokens (no 'acc.<module>.tokens' entries, a valid checksum)
    resumes to the same factors; the collection then records no counts (tokens() None) rather than partial ones."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from yaqa_ext.hessians import _checksum

    kw = dict(sketch="B", power_iters=2, n_seqs=N_SEQS, seq_len=SEQ_LEN, batch_size=1, progress=False)
    model = _interrupted_collection(tmp_path / "a", tokens)
    state = tmp_path / "a" / "collect-state-rank0.safetensors"
    with safe_open(str(state), "pt") as f:
        meta = f.metadata()
    tensors = {k: v for k, v in load_file(state).items() if not k.endswith(".tokens")}
    counters = {k: meta[k] for k in ("group", "round", "next_batch")}
    save_file(tensors, state, metadata={**meta, "checksum": _checksum(tensors, counters)})
    collect_hessians(model, tokens, tmp_path / "a", **kw)
    collect_hessians(tiny_model("llama"), tokens, tmp_path / "b", **kw)
    a, b = load_hessians(tmp_path / "a"), load_hessians(tmp_path / "b")
    for name in a.modules:
        assert a.tokens(name) is None and b.tokens(name) == N_SEQS * SEQ_LEN
        for x, y in zip(a.load(name), b.load(name)):
            assert torch.equal(x, y)
