"""compressed-tensors export, checked with the compressed-tensors package (a test dependency) through transformers'
own loader: every quantized layer decompresses to exactly our layer's weight (fp32 export), the logits follow
(decompressed up front and in the packed runtime form), lower-precision exports round only as their dtype does,
the CLI exports a real model with its tokenizer, and every configuration the format cannot hold is refused by name."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_family

from yaqa_ext import QuantConfig, QuantizedLinear, quantize
from yaqa_ext.cli import main
from yaqa_ext.export import export_compressed_tensors
from yaqa_ext.hf import dequantize

pytest.importorskip("compressed_tensors")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils.quantization_config import CompressedTensorsConfig  # noqa: E402


def load_dense(folder, dtype=torch.float32):
    """The export loaded by transformers + compressed-tensors, every layer decompressed to an nn.Linear."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                quantization_config=CompressedTensorsConfig(dequantize=True))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("bits", "symmetric", "group_size"), [
    (4, False, 8), (8, False, None), (3, False, 16), (2, False, 8),  # the format's own asymmetric b-bit grids
    (4, True, None), (2, True, 8),  # midrise symmetric grids, widened to b + 1 bits
])
def test_every_layer_decompresses_to_our_weight(bits, symmetric, group_size, tmp_path, ids):
    model = tiny_family("llama")
    quantize(model, QuantConfig(method="rtn", bits=bits, symmetric=symmetric, group_size=group_size, rht=False),
             progress=False)
    export_compressed_tensors(model, tmp_path / "ct", dtype=torch.float32, widen_symmetric=symmetric)
    dense = load_dense(tmp_path / "ct")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        loaded = dense.get_submodule(name)
        assert type(loaded) is torch.nn.Linear, name
        # (u - z') s' in fp32 of integer codes and fp16 scales: exact
        assert torch.equal(loaded.weight, layer.weight_matrix()), name
    assert torch.equal(dense.lm_head.weight, model.lm_head.weight)
    torch.testing.assert_close(logits(dense, ids), logits(model, ids), rtol=1e-5, atol=1e-5)  # fp32 sums' order
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)  # decompressed on first use
    torch.testing.assert_close(logits(packed, ids), logits(dense, ids), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_exports_round_as_their_dtype(dtype, tmp_path, ids):
    """Scales in fp16 / bf16 and the format's (u - z) s in that dtype: each weight within half an ulp of the dtype
    (twice: the scale's rounding and the product's) of ours."""
    model = tiny_family("llama")
    quantize(model, QuantConfig(method="rtn", bits=4, symmetric=False, group_size=8, rht=False), progress=False)
    export_compressed_tensors(model, tmp_path / "ct", dtype=dtype)
    dense = load_dense(tmp_path / "ct", dtype)
    ulp = torch.finfo(dtype).eps
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)):
        ours, theirs = layer.weight_matrix().double(), dense.get_submodule(name).weight.double()
        assert bool(((theirs - ours).abs() <= ulp * ours.abs() + 1e-30).all()), name
        assert dense.get_submodule(name).weight.dtype == dtype


def test_what_the_format_cannot_hold_is_refused_by_name(tmp_path):
    base = tiny_family("llama")
    cases = [
        (QuantConfig(method="rtn", bits=4, symmetric=False), "random Hadamard transform"),
        (QuantConfig(method="rtn", bits=4, rht=False), "widen_symmetric=True"),
        (QuantConfig(method="rtn", bits=4, symmetric=False, rht=False, lowrank_rank=2, lowrank_method="svd"),
         "a low-rank term"),
        (QuantConfig(method="rtn", bits=2, quantizer="e8p", rht=False), "codebook 'e8p'"),
        (QuantConfig(method="rtn", bits=8, rht=False), "8-bit grid, which needs 9-bit integers"),
    ]
    for config, message in cases:
        model = copy.deepcopy(base)
        quantize(model, config, progress=False)
        with pytest.raises(ValueError, match=f"model.layers.0.self_attn.q_proj: .*{message}"):
            export_compressed_tensors(model, tmp_path / "x")
        assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="no quantized layer"):
        export_compressed_tensors(base, tmp_path / "x")
    quantize(base, QuantConfig(method="rtn", bits=4, symmetric=False, rht=False), progress=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_compressed_tensors(base, tmp_path / "taken")
    assert (tmp_path / "taken" / "file").read_text() == "mine"


def test_cli_exports_a_real_model_with_its_tokenizer(shared, tmp_path, capsys):
    """stories260K: LDLQ 4-bit (asymmetric, no RHT) by `yaqa quantize`, then `yaqa export`: transformers loads
    the export without yaqa_ext's loader, with our quantized layers' logits, and its tokenizer."""
    q, ct = tmp_path / "q", tmp_path / "ct"
    assert main(["quantize", "--method", "ldlq", "--bits", "4", "--asymmetric", "--no-rht", "--out", str(q),
                 "--n-seqs", "8", "--seq-len", "64", "--device", "cpu"]) == 0
    assert main(["export", "--quant", str(q), "--out", str(ct), "--dtype", "float32"]) == 0
    assert "vllm serve" in capsys.readouterr().out
    ours = AutoModelForCausalLM.from_pretrained(q)
    theirs = load_dense(ct)
    layers = [n for n, m in ours.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 35
    for name in layers:
        assert torch.equal(theirs.get_submodule(name).weight, ours.get_submodule(name).weight_matrix()), name
    ids = torch.tensor([AutoTokenizer.from_pretrained(ct).encode("Once upon a time there was a cat.")])
    assert ids.size(1) > 5
    # the same weights in dense layers: the same logits (our fused kernel sums in another order: up to 2.3e-5 apart)
    torch.testing.assert_close(logits(theirs, ids), logits(dequantize(ours), ids), rtol=0, atol=0)
    with pytest.raises(SystemExit):  # the folder exists now: never overwritten
        main(["export", "--quant", str(q), "--out", str(ct)])
    assert "not an empty folder" in capsys.readouterr().err
