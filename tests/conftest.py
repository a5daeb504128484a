"""Shared fixtures: the devices to test on and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import yaqa_ext

def pytest_configure(config: pytest.Config) -> None:
    """The fuzz suite's size: the default hypothesis profile, 10x the examples when slow tests are asked for."""
    from hypothesis import settings

    settings.register_profile("yaqa", max_examples=150, deadline=None, derandomize=bool(os.environ.get("CI")))
    settings.register_profile("yaqa-slow", max_examples=1500, deadline=None)
    settings.load_profile("yaqa-slow" if config.getoption("markexpr") == "slow" else "yaqa")


SHARED = Path(__file__).resolve().parents[1].parent / "shared"
os.environ.setdefault("YAQA_SHARED", str(SHARED))  # the library reads the shared folder from here only

CUDA_OK = torch.cuda.is_available() and yaqa_ext.WITH_CUDA
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and a CUDA build"))]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every backend the op has: CPU always, CUDA when a GPU is present."""
    return request.param


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "models").is_dir():
        pytest.skip(f"shared data folder not found at {SHARED}")
    return SHARED


TINY_ARCHS = ("llama", "qwen2", "mistral", "gpt_neox", "opt", "gpt2")


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A tiny random-weight causal LM of one of the supported families (2 decoder layers, vocab 64)."""
    import transformers as tf

    common = dict(vocab_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)
    configs = {
        "llama": lambda: tf.LlamaConfig(hidden_size=16, intermediate_size=24, num_key_value_heads=1, **common),
        "qwen2": lambda: tf.Qwen2Config(hidden_size=16, intermediate_size=24, num_key_value_heads=1, **common),
        "mistral": lambda: tf.MistralConfig(hidden_size=16, intermediate_size=24, num_key_value_heads=1, **common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=16, intermediate_size=24, **common),
        "opt": lambda: tf.OPTConfig(hidden_size=16, ffn_dim=24, word_embed_proj_dim=16, **common),
        "gpt2": lambda: tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64, vocab_size=64, bos_token_id=0,
                                      eos_token_id=0),
    }
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(configs[arch]())
    return model.to(dtype).eval()


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "gpt2", "opt", "gpt_neox",
            "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
"""Every decoder family checked by tests/test_arch.py (MoE: mixtral and the five after gpt_neox)."""
MOE_FAMILIES = FAMILIES[10:]


def tiny_family(model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A tiny random-weight causal LM of any transformers ``model_type`` (2 decoder layers, hidden 32, vocab 64; MoE:
    4 experts, 2 per token; DeepSeek-V3: its first layer dense, the second MoE)."""
    import transformers as tf

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                 num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2,
                 shared_expert_intermediate_size=40, first_k_dense_replace=1, n_group=1, topk_group=1,
                 kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                 n_embd=32, n_layer=2, n_head=4, n_positions=64, ffn_dim=48, word_embed_proj_dim=32,
                 pad_token_id=0, bos_token_id=0, eos_token_id=1)
    default = tf.AutoConfig.for_model(model_type)
    if hasattr(default, "qk_rope_head_dim"):  # multi-head latent attention: RoPE acts on head_dim channels
        sizes["head_dim"] = sizes["qk_rope_head_dim"]
    config = tf.AutoConfig.for_model(model_type, **{k: v for k, v in sizes.items() if hasattr(default, k)})
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(config).to(dtype).eval()
