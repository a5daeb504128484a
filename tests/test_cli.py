"""The ``yaqa`` command line on the real default model."""

from __future__ import annotations

import json
import re

import pytest
import torch

from yaqa_ext.cli import main
from yaqa_ext.config import ungroup_specs


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out


def test_demo_factors_every_linear_layer(shared, capsys):
    assert main(["demo", "--n-seqs", "2", "--seq-len", "64", "--device", "cpu"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if re.match(r"model\.layers\.\d+\.", line)]
    # stories260K: 5 decoder layers x (q, k, v, o, gate, up, down).
    assert len(rows) == 35
    for name, n, block, damp, err, _ms in rows:
        assert int(n) % int(block) == 0
        assert float(err) < 1e-5, f"{name}: LDL reconstruction error {err}"


def test_collect_command_writes_a_resumable_collection(shared, tmp_path, capsys):
    from yaqa_ext.hessians import load_hessians

    args = ["collect", "--out", str(tmp_path), "--n-seqs", "4", "--seq-len", "32", "--batch-size", "2",
            "--layers", "3-4", "--layers-per-pass", "1", "--device", "cpu", "--sketch", "A", "--power-iters", "2"]
    assert main(args) == 0
    h = load_hessians(tmp_path)
    assert h.manifest["layers"] == [3, 4] and h.manifest["passes"] == ["input", "A_out", "A_in"]
    assert h.manifest["layers_per_pass"] == 1
    assert h.manifest["tokens"] == 128 and len(h.modules) == 14
    assert main(args) == 0  # the same command again: already complete, reused
    assert f"Hessian factors written to {tmp_path}" in capsys.readouterr().out


def test_quantize_then_eval_commands(shared, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from yaqa_ext import QuantizedLinear

    out = tmp_path / "q"
    assert main(["quantize", "--method", "ldlq", "--bits", "3", "--out", str(out), "--n-seqs", "8", "--seq-len", "64",
                 "--device", "cpu", "--skip", r"layers\.4\."]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)
    assert isinstance(model.model.layers[4].self_attn.q_proj, torch.nn.Linear)  # skipped
    report = (out / "quantization_report.json").read_text()
    assert '"method": "ldlq"' in report
    capsys.readouterr()
    assert main(["eval", "--quant", str(out), "--n-seqs", "4", "--seq-len", "64", "--device", "cpu"]) == 0
    line = capsys.readouterr().out
    kl = float(re.search(r"KL\(orig \|\| quant\) = ([0-9.]+)", line).group(1))
    assert 0 < kl < 5


def test_version_and_defaults(capsys):
    import yaqa_ext

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and f"yaqa_ext {yaqa_ext.__version__}" in capsys.readouterr().out
    from yaqa_ext.cli import _parser

    args = _parser().parse_args(["quantize", "--out", "q"])
    assert args.bits == 4 and args.group_size is None  # GPTQ / AWQ users expect 4 bits; one scale per row


def test_quantize_with_finetuning(shared, tmp_path):
    """--finetune-epochs trains the blocks on calibration text; the per-block checkpoints go once the model is saved."""
    out = tmp_path / "q"
    assert main(["quantize", "--method", "rtn", "--bits", "3", "--out", str(out), "--n-seqs", "8", "--seq-len", "32",
                 "--device", "cpu", "--finetune-epochs", "1", "--finetune-lr", "1e-3"]) == 0
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["config"]["finetune_epochs"] == 1 and len(report["finetune"]) == 5 * 4  # 5 blocks, 4 groups each
    assert all(e["error_after"] <= e["error_before"] for e in report["finetune"])
    assert not (out / "finetune-state").exists()


def test_quantize_with_the_e8p_codebook(shared, tmp_path):
    """--quantizer e8p: layers stored as E8P codes, loadable for eval; a layer whose input size is not a multiple
    of 8 (stories260K's 172-wide down_proj) stays in float, named in the warning and the report."""
    out = tmp_path / "q"
    args = ["quantize", "--method", "ldlq", "--bits", "2", "--quantizer", "e8p", "--out", str(out), "--n-seqs", "4",
            "--seq-len", "32", "--device", "cpu"]
    with pytest.warns(UserWarning, match=r"shape 64 x 172 not a multiple of the e8p codebook's unit 1 x 8: "
                                         r"model.layers.0.mlp.down_proj.weight"):
        assert main(args) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    specs = ungroup_specs(config["modules"])
    assert config["quantizer"] == "e8p" and {s["codebook"] for s in specs.values()} == {"e8p"}
    assert len(specs) == 5 * 6  # 5 blocks, every linear but down_proj
    untargeted = json.loads((out / "quantization_report.json").read_text())["coverage"]["untargeted"]
    assert set(untargeted) == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(5)}
    assert main(["eval", "--quant", str(out), "--n-seqs", "2", "--seq-len", "32", "--device", "cpu"]) == 0


def test_run_pipeline_is_resumable(shared, tmp_path, capsys):
    args = ["run", "--out", str(tmp_path), "--methods", "rtn", "yaqa-B", "--bits", "4", "--n-seqs", "8", "--seq-len",
            "64", "--eval-seqs", "4", "--eval-len", "64", "--device", "cpu"]
    assert main(args) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {(r["method"], r["bits"]) for r in rows} == {("rtn", 4), ("yaqa-B", 4)}
    table = (tmp_path / "results.md").read_text()
    assert "| 4 | rtn |" in table and "| 4 | yaqa-B |" in table
    capsys.readouterr()
    assert main(args) == 0  # every row is done: nothing is collected or quantized again
    second = capsys.readouterr().out
    assert "bit seed" not in second and "factors for" not in second and "| 4 | yaqa-B |" in second
    assert len(json.loads((tmp_path / "results.json").read_text())["rows"]) == 2
    (tmp_path / "own.txt").write_text(" ".join(json.loads((tmp_path / "results.json").read_text())["model"] for _ in range(3000)))
    for changed, name in ((["--n-seqs", "16"], "n_seqs"), (["--tile", "4"], "td_x, td_y"),
                          (["--data", str(tmp_path / "own.txt")], "calibration")):
        with pytest.raises(SystemExit):  # rows of other settings are never mixed into one table
            main(args[:-2] + changed + args[-2:])
        assert f"differing: {name}" in capsys.readouterr().err
    # Rows saved before a QuantConfig field existed resume when it is at its default, and only then.
    # So do rows whose learning rate differs where fine-tuning was off (it had no effect).
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("finetune_epochs", "rounding_scale_search"):
        del saved["settings"][key]
    saved["settings"]["finetune_lr"] = 5e-5
    (tmp_path / "results.json").write_text(json.dumps(saved))
    assert main(args) == 0
    assert "bit seed" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(args + ["--finetune-epochs", "1"])
    assert "differing: finetune_epochs" in capsys.readouterr().err


def test_run_with_datafree_and_lowrank_methods(shared, tmp_path):
    args = ["run", "--out", str(tmp_path), "--methods", "datafree", "rtn+qera-exact:4", "rtn", "--bits", "4",
            "--n-seqs", "8", "--seq-len", "64", "--eval-seqs", "4", "--eval-len", "64", "--device", "cpu"]
    assert main(args) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert set(rows) == {"datafree", "rtn+qera-exact:4", "rtn"}
    assert (tmp_path / "hessians" / "input-seed0" / "manifest.json").exists()  # qera reads the input moments
    # stories260K: 7 layers of 64 x 64 (q, o), 32 x 64 (k, v), 172 x 64 and 64 x 172 (MLP) per block, 16-bit A and B
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (172, 64), (172, 64), (64, 172)]
    extra = 16 * 4 * sum(m + n for m, n in shapes) / sum(m * n for m, n in shapes)
    assert rows["rtn+qera-exact:4"]["bits_per_weight"] == pytest.approx(rows["rtn"]["bits_per_weight"] + extra)
    assert rows["rtn+qera-exact:4"]["kl"] < rows["rtn"]["kl"]  # the same rounding plus its best rank-4 correction
    table = (tmp_path / "results.md").read_text()
    assert table.index("| rtn |") < table.index("| rtn+qera-exact:4 |") < table.index("| datafree |")


def test_run_skip_keeps_modules_unquantized_in_every_row(shared, tmp_path, capsys):
    args = ["run", "--out", str(tmp_path), "--methods", "rtn", "--bits", "4", "--n-seqs", "8", "--seq-len", "64",
            "--eval-seqs", "4", "--eval-len", "64", "--device", "cpu", "--skip", r"mlp\.", "--skip", r"\.q_proj"]
    assert main(args) == 0
    layers = json.loads((tmp_path / "layers" / "rtn-4bit-seed0.json").read_text())
    # stories260K: 5 blocks; of q, k, v, o and the three MLP matrices only k, v and o are quantized
    assert sorted(layer["name"] for layer in layers) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(5) for p in ("k_proj", "v_proj", "o_proj"))
    with pytest.raises(SystemExit):  # rows of another selection are never mixed into one table
        main(args[:-2])
    assert "differing: skip" in capsys.readouterr().err


@pytest.mark.parametrize(("spec", "message"), [
    ("gptq", "unknown method 'gptq'"),
    ("yaqa-B+pca:8", "bad low-rank term in 'yaqa-B\\+pca:8'"),
    ("yaqa-B+kl", "bad low-rank term"),
    ("ldlq+kl:8", "needs YAQA's two factors"),
])
def test_run_rejects_bad_method_names(tmp_path, capsys, spec, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--out", str(tmp_path), "--methods", spec])
    assert exit_info.value.code == 2
    assert re.search(f"yaqa run: error: .*{message}", capsys.readouterr().err)


def _broken_llama2c(tmp_path):
    from yaqa_ext.models import shared_dir

    src = next((shared_dir() / "models" / "stories260K").glob("*.bin"))
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / src.name).write_bytes(src.read_bytes()[:-100])
    return str(folder)


@pytest.mark.parametrize(("case", "args", "message"), [
    ("missing local model", ["collect", "--model", "./no/such/model", "--out", "{tmp}/o"],
     r"model './no/such/model': no such file or folder"),
    ("missing absolute model", ["quantize", "--model", "/no/such/model.gguf", "--out", "{tmp}/o", "--method", "rtn"],
     "no such file or folder"),
    ("broken llama2.c", ["quantize", "--model", "{broken}", "--out", "{tmp}/o", "--method", "rtn"],
     r"holds no model: .*stories260K.bin: \d+ bytes where its header needs \d+"),
    ("empty out", ["collect", "--out", ""], "argument --out: the folder is empty"),
    ("bad device", ["collect", "--out", "{tmp}/o", "--device", "gpu0"], "argument --device: 'gpu0' is not a device"),
    ("bad regex", ["collect", "--out", "{tmp}/o", "--include", "q_proj("], "argument --include: 'q_proj\\(' is not a "
     "regular expression"),
    ("bad skip regex", ["quantize", "--out", "{tmp}/o", "--skip", "[a-"], "argument --skip: .* is not a regular"),
    ("bits before collection", ["run", "--out", "{tmp}/o", "--methods", "yaqa-B", "--bits", "9"], "bits"),
])
def test_bad_arguments_end_in_one_line(shared, tmp_path, capsys, case, args, message):
    """Each used to end in a traceback, be taken for a hub id, write into the current folder, or (bits) reject
    the argument only after collecting every Hessian."""
    args = [a.format(tmp=tmp_path, broken=_broken_llama2c(tmp_path) if "{broken}" in a else "") for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "o" / "hessians").exists()  # nothing collected before the error


def test_unexpected_errors_end_in_one_line(monkeypatch, capsys):
    import yaqa_ext.cli as cli

    def boom(args):
        raise RuntimeError("out of memory in a kernel")

    monkeypatch.setattr(cli, "_dispatch", boom)
    with pytest.raises(SystemExit) as exit_info:
        main(["collect", "--out", "x"])
    assert exit_info.value.code == 2
    assert "yaqa collect: error: RuntimeError: out of memory in a kernel (YAQA_DEBUG=1" in capsys.readouterr().err


def test_quantize_keeps_its_collection_under_out_and_replaces_only_its_own_output(shared, tmp_path, capsys):
    """The calibration factors live in OUT/hessians (a killed run resumes them; a rerun reuses them), the model
    is published file by file with config.json last, and a folder of someone else's files is refused."""
    out = tmp_path / "q"
    args = ["quantize", "--method", "ldlq", "--bits", "4", "--out", str(out), "--n-seqs", "4", "--seq-len", "32",
            "--device", "cpu"]
    assert main(args) == 0
    manifest = out / "hessians" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert f"calibration factors kept in {out / 'hessians'}" in capsys.readouterr().out
    (out / "model.safetensors").write_bytes(b"an older model")
    (out / "old-shard.safetensors").write_bytes(b"from an earlier save")
    assert main(args) == 0
    assert manifest.stat().st_mtime_ns == stamp  # the collection was reused, not redone
    assert not (out / "old-shard.safetensors").exists() and not list(out.glob(".model-*"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # the published folder is complete
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("mine")
    with pytest.raises(SystemExit):
        main(["quantize", "--method", "rtn", "--out", str(other), "--device", "cpu"])
    assert "not a yaqa quantize output" in capsys.readouterr().err and (other / "thesis.tex").exists()


def test_moe_model_collect_reports_expert_tokens_and_quantize_falls_back(shared, tmp_path, capsys):
    """A tiny Mixtral (stories260K's tokenizer) through `yaqa collect` and `yaqa quantize`: the routed-token range
    printed is the collection's, each expert matrix under --expert-min-tokens is listed with the fallback rule
    in the report, and the saved folder loads with one quantized linear per expert."""
    import transformers as tf

    from yaqa_ext import QuantizedLinear
    from yaqa_ext.arch import RoutedExperts
    from yaqa_ext.hessians import load_hessians
    from yaqa_ext.models import load_model

    _, tokenizer = load_model("stories260K")
    torch.manual_seed(0)
    config = tf.MixtralConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    common = ["--model", str(tmp_path / "moe"), "--n-seqs", "4", "--seq-len", "32", "--device", "cpu"]
    assert main(["collect", "--out", str(tmp_path / "h"), "--sketch", "B", "--batch-size", "2", *common]) == 0
    counts = load_hessians(tmp_path / "h").expert_tokens()
    assert len(counts) == 16 and sum(counts.values()) == 2 * 2 * 4 * 32 * 2  # layers x matrices x tokens x top-2
    assert f"MoE experts: 16 matrices saw {min(counts.values())} to {max(counts.values())} routed tokens" in capsys.readouterr().out
    threshold = sorted(counts.values())[8]
    assert main(["quantize", "--out", str(tmp_path / "q"), "--hessians", str(tmp_path / "h"), "--bits", "4",
                 "--expert-min-tokens", str(threshold), "--expert-fallback", "rtn", *common]) == 0
    assert "MoE expert matrices saw fewer than" in capsys.readouterr().out
    layers = json.loads((tmp_path / "q" / "quantization_report.json").read_text())["layers"]
    fell = {r["name"]: r["tokens"] for r in layers if r["fallback"] == "round to nearest"}
    assert fell == {n: c for n, c in counts.items() if c < threshold} and fell
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(model.model.layers[0].mlp.experts, RoutedExperts)
    assert isinstance(model.model.layers[0].mlp.experts[3].down_proj, QuantizedLinear)


def test_collect_reads_json_lines_with_a_text_field(shared, tmp_path, capsys):
    """The same texts as a JSON Lines file (field 'body', --text-field) and as a folder of *.txt give the same
    factors, bit for bit; a missing field is one line naming it."""
    from yaqa_ext.data import corpus_texts
    from yaqa_ext.hessians import load_hessians

    texts = [t[:2000] for t in corpus_texts("calibration")[:6]]
    (tmp_path / "texts").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "texts" / f"{i:02d}.txt").write_text(t)
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts))
    common = ["collect", "--sketch", "input", "--n-seqs", "4", "--seq-len", "64", "--layers", "0", "--device", "cpu"]
    assert main([*common, "--data", str(tmp_path / "texts"), "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--data", str(tmp_path / "data.jsonl"), "--text-field", "body", "--out", str(tmp_path / "b")]) == 0
    a, b = load_hessians(tmp_path / "a"), load_hessians(tmp_path / "b")
    assert a.manifest["fingerprint"] == b.manifest["fingerprint"]
    for name in a.modules:
        assert torch.equal(a.load(name)[0], b.load(name)[0]), name
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "c")])
    assert exit_info.value.code == 2
    assert "record 1: no text or conversation in field 'text' (it has ['body'])" in capsys.readouterr().err


def test_eval_tasks_without_lm_eval_names_the_package(shared, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm_eval is installed: tests/test_lm_eval.py runs the tasks")
    assert main(["quantize", "--method", "rtn", "--bits", "4", "--out", str(tmp_path / "q"), "--device", "cpu"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--quant", str(tmp_path / "q"), "--n-seqs", "2", "--seq-len", "32", "--tasks", "hellaswag"])
    assert exit_info.value.code == 2 and "pip install lm_eval" in capsys.readouterr().err
