"""A saved yaqa model cannot be loaded wrongly: in a process without yaqa_ext transformers refuses it (asking for
trust_remote_code, or naming yaqa_ext when it is not installed) instead of filling random weights; with
trust_remote_code the folder's loader imports yaqa_ext and the logits are the saved model's; older folders
(model_type of the architecture) still load and are re-saved in the protected form."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TINY_ARCHS, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

import yaqa_ext  # noqa: F401  (registers the quantizer and the saved config type with transformers)
from yaqa_ext import QuantConfig, QuantizedLinear, quantize
from yaqa_ext.hf import dequantize

# The child's view of a machine without yaqa_ext: every import of it fails as a missing package's does.
_HIDE_YAQA = textwrap.dedent("""
    import sys
    class _Missing:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "yaqa_ext":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, _Missing())
""")


def _child(code: str, hide_yaqa: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that has not imported yaqa_ext (stdin closed: no prompt to answer)."""
    script = (_HIDE_YAQA if hide_yaqa else "") + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=300)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama quantized with rtn and saved, its logits on fixed tokens, and the tokens."""
    model = tiny_model("llama")
    quantize(model, QuantConfig(method="rtn", bits=4), progress=False)
    folder = tmp_path_factory.mktemp("saved")
    model.save_pretrained(folder)
    tokens = torch.arange(12).reshape(1, 12) % model.config.vocab_size
    with torch.no_grad():
        logits = model(tokens).logits
    torch.save({"tokens": tokens, "logits": logits}, folder.parent / "expected.pt")
    return model, folder


def test_saved_config_names_yaqa_ext_and_keeps_the_architecture(saved):
    model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "yaqa_ext" and config["yaqa_model_type"] == "llama"
    assert config["auto_map"] == {"AutoConfig": "configuration_yaqa_ext.YaqaSavedConfig"}
    assert config["quantization_config"]["quant_method"] == "yaqa"
    assert "from yaqa_ext.hf import YaqaSavedConfig" in (folder / "configuration_yaqa_ext.py").read_text()
    # In memory the model is still its architecture: its config reads and compares as before.
    assert isinstance(model.config, type(tiny_model("llama").config)) and model.config.model_type == "llama"
    assert AutoConfig.from_pretrained(folder).model_type == "llama"


def test_plain_transformers_refuses_the_folder_without_yaqa_ext(saved):
    _, folder = saved
    done = _child(f"""
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(folder)!r})
        print("LOADED")
    """)
    assert done.returncode != 0 and "LOADED" not in done.stdout
    assert "trust_remote_code=True" in done.stderr and "custom code" in done.stderr


def test_trust_remote_code_without_yaqa_ext_installed_names_it(saved):
    _, folder = saved
    done = _child(f"""
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        print("LOADED")
    """, hide_yaqa=True)
    assert done.returncode != 0 and "LOADED" not in done.stdout
    assert "pip install yaqa_ext" in done.stderr


def test_trust_remote_code_loads_the_saved_logits_in_a_process_without_the_import(saved):
    _, folder = saved
    done = _child(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        assert "yaqa_ext" not in sys.modules
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        expected = torch.load({str(folder.parent / "expected.pt")!r})
        with torch.no_grad():
            assert torch.equal(model(expected["tokens"]).logits, expected["logits"]), "logits differ"
        print("LOADED", type(model.model.layers[0].mlp.down_proj).__name__)
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LOADED QuantizedLinear" in done.stdout


def test_a_folder_saved_before_the_protection_loads_and_resaves_protected(saved, tmp_path):
    model, folder = saved
    for f in folder.iterdir():
        (tmp_path / "old").mkdir(exist_ok=True)
        (tmp_path / "old" / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config["model_type"] = config.pop("yaqa_model_type")
    del config["auto_map"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    (tmp_path / "old" / "configuration_yaqa_ext.py").unlink()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "old")
    tokens = torch.arange(12).reshape(1, 12) % model.config.vocab_size
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    loaded.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["model_type"] == "yaqa_ext"
    assert (tmp_path / "new" / "configuration_yaqa_ext.py").exists()


def test_config_json_groups_the_layer_specs_and_per_module_specs_still_load(saved, tmp_path):
    """config.json holds one spec per distinct layer shape plus each module's RHT seed, not one spec per
    module; a folder written with one spec per module (before the grouping) loads the same."""
    model, folder = saved
    groups = json.loads((folder / "config.json").read_text())["quantization_config"]["modules"]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    # an independent count: the distinct (in, out) shapes of the quantized linears
    assert len(groups) == len({(m.in_features, m.out_features) for m in layers.values()})
    assert {n: seed for g in groups for n, seed in g["rht_seeds"].items()} == {n: m.rht_seed for n, m in layers.items()}
    for g in groups:
        for name in g["rht_seeds"]:
            assert {**g["spec"], "rht_seed": layers[name].rht_seed} == layers[name].spec()
    for f in folder.iterdir():
        (tmp_path / "per-module").mkdir(exist_ok=True)
        (tmp_path / "per-module" / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"].pop("format_version") == 2  # older folders: no version, per-module specs
    config["quantization_config"]["modules"] = {n: m.spec() for n, m in layers.items()}
    (tmp_path / "per-module" / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "per-module")
    tokens = torch.arange(12).reshape(1, 12) % model.config.vocab_size
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    config["quantization_config"]["modules"] = [{"spec": {}}]  # damaged: no seeds
    (tmp_path / "per-module" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rht_seeds"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "per-module")
    config["quantization_config"]["format_version"] = 4  # from a newer yaqa_ext
    (tmp_path / "per-module" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"format_version 4; this yaqa_ext reads versions 1 to 3: upgrade yaqa_ext"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "per-module")


def test_marked_config_pickles_copies_and_dequantizes_to_the_plain_class(saved):
    model, _ = saved
    plain_class = type(tiny_model("llama").config)
    for copied in (pickle.loads(pickle.dumps(model.config)), copy.deepcopy(model.config)):
        assert type(copied) is type(model.config) and copied.to_dict() == model.config.to_dict()
        assert json.loads(copied.to_json_string())["model_type"] == "yaqa_ext"
    plain = dequantize(copy.deepcopy(model))
    assert type(plain.config) is plain_class and not isinstance(plain.model.layers[0].mlp.down_proj, QuantizedLinear)
    assert json.loads(plain.config.to_json_string())["model_type"] == "llama"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_family_saves_protected_and_reloads(arch, tmp_path):
    model = tiny_model(arch)
    quantize(model, QuantConfig(method="rtn", bits=4), progress=False)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "yaqa_ext" and config["yaqa_model_type"] == arch
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    tokens = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
