"""llama2.c checkpoints as Hugging Face ``LlamaForCausalLM`` models (interleaved RoPE -> rotate_half)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Llama2cHeader", "find_llama2c_checkpoint", "find_sentencepiece_model", "load_llama2c",
           "sentencepiece_tokenizer"]

_HEADER = struct.Struct("<7i")


class Llama2cHeader:
    """The seven int32 of a legacy llama2.c checkpoint header."""

    def __init__(self, raw: bytes, path: Path) -> None:
        dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = _HEADER.unpack(raw)
        self.dim, self.hidden_dim, self.n_layers = dim, hidden, n_layers
        self.n_heads, self.n_kv_heads, self.seq_len = n_heads, n_kv_heads, seq_len
        self.shared_classifier = vocab > 0
        self.vocab_size = abs(vocab)
        if min(dim, hidden, n_layers, n_heads, n_kv_heads, self.vocab_size, seq_len) <= 0 or dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"{path}: not a llama2.c checkpoint (header {_HEADER.unpack(raw)})")
        self.head_dim = dim // n_heads

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """The checkpoint's tensors, in file order."""
        L, d, h, kv = self.n_layers, self.dim, self.hidden_dim, self.n_kv_heads * self.head_dim
        shapes = [
            ("token_embedding", (self.vocab_size, d)),
            ("rms_att", (L, d)),
            ("wq", (L, d, d)),
            ("wk", (L, kv, d)),
            ("wv", (L, kv, d)),
            ("wo", (L, d, d)),
            ("rms_ffn", (L, d)),
            ("w1", (L, h, d)),
            ("w2", (L, d, h)),
            ("w3", (L, h, d)),
            ("rms_final", (d,)),
            ("freq_cis_real", (self.seq_len, self.head_dim // 2)),
            ("freq_cis_imag", (self.seq_len, self.head_dim // 2)),
        ]
        if not self.shared_classifier:
            shapes.append(("wcls", (self.vocab_size, d)))
        return shapes


def read_llama2c(path: str | os.PathLike) -> tuple[Llama2cHeader, dict[str, Tensor]]:
    """The header and the fp32 tensors of a llama2.c legacy checkpoint, by llama2.c name."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < _HEADER.size:
        raise ValueError(f"{path}: too short to be a llama2.c checkpoint ({len(raw)} bytes)")
    header = Llama2cHeader(raw[: _HEADER.size], path)
    shapes = header.tensor_shapes()
    expected = _HEADER.size + 4 * sum(torch.Size(s).numel() for _, s in shapes)
    if len(raw) != expected:
        raise ValueError(
            f"{path}: {len(raw)} bytes, but its header {_HEADER.unpack(raw[:_HEADER.size])} implies {expected}; "
            "the file is truncated or not a legacy (version 0) llama2.c checkpoint"
        )
    flat = torch.frombuffer(bytearray(raw[_HEADER.size :]), dtype=torch.float32)
    tensors, offset = {}, 0
    for name, shape in shapes:
        numel = torch.Size(shape).numel()
        tensors[name] = flat[offset : offset + numel].view(shape)
        offset += numel
    return header, tensors


def _to_rotate_half(w: Tensor, n_heads: int) -> Tensor:
    """Reorder q/k projection rows from interleaved RoPE pairs (2i, 2i+1) to halves (i, i + hd/2)."""
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def load_llama2c(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A ``LlamaForCausalLM`` with the weights of a llama2.c checkpoint (``.bin`` file or its folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    checkpoint = find_llama2c_checkpoint(path)
    if checkpoint is None:
        raise FileNotFoundError(f"{path}: no llama2.c checkpoint (*.bin with a llama2.c header) found")
    h, t = read_llama2c(checkpoint)
    config = LlamaConfig(
        vocab_size=h.vocab_size,
        hidden_size=h.dim,
        intermediate_size=h.hidden_dim,
        num_hidden_layers=h.n_layers,
        num_attention_heads=h.n_heads,
        num_key_value_heads=h.n_kv_heads,
        max_position_embeddings=h.seq_len,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=h.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
        dtype=dtype,
    )
    state = {"model.embed_tokens.weight": t["token_embedding"], "model.norm.weight": t["rms_final"]}
    state["lm_head.weight"] = t["token_embedding"] if h.shared_classifier else t["wcls"]
    for i in range(h.n_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = t["rms_att"][i]
        state[p + "post_attention_layernorm.weight"] = t["rms_ffn"][i]
        state[p + "self_attn.q_proj.weight"] = _to_rotate_half(t["wq"][i], h.n_heads)
        state[p + "self_attn.k_proj.weight"] = _to_rotate_half(t["wk"][i], h.n_kv_heads)
        state[p + "self_attn.v_proj.weight"] = t["wv"][i]
        state[p + "self_attn.o_proj.weight"] = t["wo"][i]
        state[p + "mlp.gate_proj.weight"] = t["w1"][i]
        state[p + "mlp.down_proj.weight"] = t["w2"][i]
        state[p + "mlp.up_proj.weight"] = t["w3"][i]
    model = LlamaForCausalLM(config).to(dtype)
    model.load_state_dict(state, strict=True)
    model.name_or_path = str(checkpoint)
    return model.eval()


def llama2c_problem(path: Path) -> str | None:
    """Why ``path`` is not a llama2.c checkpoint (None when it is one): no file, a bad header, a wrong size."""
    if not path.is_file() or path.stat().st_size < _HEADER.size:
        return f"{path.name}: not a file of at least {_HEADER.size} bytes"
    with open(path, "rb") as f:
        try:
            header = Llama2cHeader(f.read(_HEADER.size), path)
        except ValueError as e:
            return f"{path.name}: {e}"
    expected = _HEADER.size + 4 * sum(torch.Size(s).numel() for _, s in header.tensor_shapes())
    if path.stat().st_size != expected:
        return f"{path.name}: {path.stat().st_size} bytes where its header needs {expected} (truncated or not fp32)"
    return None


def find_llama2c_checkpoint(path: str | os.PathLike) -> Path | None:
    """``path`` if it is a llama2.c checkpoint, else the single one in the folder ``path``, else None."""
    path = Path(path)
    candidates = sorted(path.glob("*.bin")) if path.is_dir() else [path]
    found = [c for c in candidates if llama2c_problem(c) is None]
    return found[0] if len(found) == 1 else None


def sentencepiece_tokenizer(model_file: str | os.PathLike):
    """A llama2.c model's SentencePiece BPE tokenizer (``tok*.model``) as a transformers tokenizer that encodes
    exactly as ``sentencepiece`` does (BOS prepended): its normaliser (runs of spaces collapsed and trimmed when
    the model says so, a dummy prefix, spaces as U+2581), words split before each space, merges in piece-score
    order, byte fallback.
    ``save_pretrained`` writes a ``tokenizer.json`` that ``AutoTokenizer`` loads with no sentencepiece."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import import_protobuf
    from transformers.tokenization_utils_base import generate_merges

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != 2 or norm.name != "identity" or norm.precompiled_charsmap:
        raise ValueError(f"{model_file}: not a llama2.c tokenizer (a BPE SentencePiece model with the identity "
                         f"normaliser); load its folder with AutoTokenizer instead")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = generate_merges(vocab, {p.piece: p.score for p in proto.pieces})
    special = {i: p.piece for i, p in enumerate(proto.pieces) if p.type in (2, 3)}  # unknown, control
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=special[trainer.unk_id], fuse_unk=True,
                               byte_fallback=trainer.byte_fallback))
    steps = [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")] \
        if norm.remove_extra_whitespaces else []
    steps += [normalizers.Prepend("\u2581")] if norm.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    # Pieces start at each space (digit and script splits were the trainer's: no piece crosses them).
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=trainer.split_by_whitespace)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else [])])
    bos = special[trainer.bos_id]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, trainer.bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=special[trainer.eos_id],
                                   unk_token=special[trainer.unk_id], clean_up_tokenization_spaces=False)


def find_sentencepiece_model(folder: str | os.PathLike) -> Path:
    """The single SentencePiece ``*.model`` file of a folder without Hugging Face tokenizer files."""
    models = sorted(Path(folder).glob("*.model"))
    if len(models) != 1:
        raise FileNotFoundError(f"{folder} has no tokenizer (tokenizer.json, tokenizer_config.json or one SentencePiece "
                                f"*.model; found {len(models)} *.model files): save one beside the model with "
                                "tokenizer.save_pretrained(folder)")
    return models[0]
