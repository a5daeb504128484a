"""Loading causal LMs: Hugging Face hub ids or folders, and llama2.c checkpoints (converted)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .fileio import atomic_dir
from .llama2c import find_llama2c_checkpoint, find_sentencepiece_model, llama2c_problem, load_llama2c, sentencepiece_tokenizer

__all__ = ["DEFAULT_MODEL", "cache_dir", "find_gguf", "gguf_as_hf", "load_model", "shared_dir", "use_default_shared"]

DEFAULT_MODEL = "stories260K"
"""The default model: ``<shared>/models/stories260K`` (a real llama2.c model, see shared_dir)."""


def shared_dir() -> Path:
    """The shared data folder (models by bare name, the demo corpus): ``$YAQA_SHARED``. The library looks nowhere
    else; the ``yaqa`` command line sets it (:func:`use_default_shared`)."""
    env = os.environ.get("YAQA_SHARED")
    if not env:
        raise FileNotFoundError("no shared data folder: set YAQA_SHARED to a folder holding models/ and data/ (the yaqa "
                                "command line finds ../shared beside the current folder or the source tree itself)")
    if not (Path(env) / "models").is_dir():
        raise FileNotFoundError(f"YAQA_SHARED={env} holds no models/ folder")
    return Path(env)


def use_default_shared() -> Path | None:
    """For applications (the CLI, the benchmarks): unless ``$YAQA_SHARED`` is set, set it to ``../shared`` beside the
    current folder or the source tree when one holds ``models/``; the folder used, or None."""
    if os.environ.get("YAQA_SHARED"):
        return Path(os.environ["YAQA_SHARED"])
    for candidate in (Path.cwd().parent / "shared", Path(__file__).resolve().parents[3] / "shared"):
        if (candidate / "models").is_dir():
            os.environ["YAQA_SHARED"] = str(candidate)
            return candidate
    return None


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ('org/name' or 'name'): absolute, relative to '.', '~', or deeper than
    'org/name', or a file name with a model suffix."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
            or name.endswith((".gguf", ".bin", ".safetensors", ".pt")))


def _resolve(name_or_path: str) -> str:
    """A local path, a folder of ``<shared>/models``, or the hub id as given; a missing local path is an error."""
    if not name_or_path.strip():
        raise ValueError("the model name is empty: pass a hub id, a folder or a file")
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser())
    local = Path(os.environ["YAQA_SHARED"]) / "models" / name_or_path if os.environ.get("YAQA_SHARED") else None
    if local is not None and local.exists():
        return str(local)
    if _looks_local(name_or_path):
        raise FileNotFoundError(f"model {name_or_path!r}: no such file or folder (a hub id looks like 'org/name')")
    return name_or_path


def _not_a_model(path: Path) -> ValueError:
    """The error for a local path that holds no loadable model, with what each kind of model needs."""
    bins = sorted(path.glob("*.bin")) if path.is_dir() else [path] if path.suffix == ".bin" else []
    problems = [p for p in map(llama2c_problem, bins) if p is not None]
    detail = f"; llama2.c: {'; '.join(problems)}" if problems else ""
    return ValueError(f"{path} holds no model: a Hugging Face folder needs config.json, a GGUF model a *.gguf file, a "
                      f"llama2.c model one valid *.bin checkpoint{detail}")


def find_gguf(source: str | os.PathLike) -> Path | None:
    """The GGUF file of ``source``: the file itself, or the only ``*.gguf`` of a folder without a
    Hugging Face ``config.json``; None otherwise."""
    path = Path(source)
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise ValueError(f"{path} holds {len(files)} GGUF files ({', '.join(f.name for f in files)}); pass the path "
                         "of the one to load")
    return files[0] if files else None


def cache_dir() -> Path:
    """Where yaqa_ext keeps derived files: ``$YAQA_CACHE``, else ``$XDG_CACHE_HOME/yaqa_ext`` (``~/.cache``)."""
    env = os.environ.get("YAQA_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "yaqa_ext"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_as_hf(gguf: str | os.PathLike) -> Path:
    """A Hugging Face folder (fp32 safetensors, config, tokenizer) of a GGUF file's dequantized model.

    transformers dequantizes GGUF weights on every load (about a minute for SmolLM2-135M on 2 cores);
    this does it once per file content and keeps the result in :func:`cache_dir` (``gguf/<name>-<sha>``),
    written atomically, so later loads take seconds and give the same weights and tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    target = cache_dir() / "gguf" / f"{gguf.stem}-{_sha256(gguf)[:16]}"
    if (target / "config.json").exists():
        return target
    with atomic_dir(target) as tmp:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are already dequantized; drop the GGUF loader's marks (transformers 5.0 sets none)
        # so they save as a plain model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    return target


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               with_tokenizer: bool = True):
    """``(model, tokenizer)`` for a llama2.c folder/file, a GGUF file (or a folder holding one), a
    local HF folder, or a hub id.

    A bare name that matches a folder in ``$YAQA_SHARED/models`` is taken from there (``"stories260K"``,
    ``"smollm2-135m"``; see :func:`shared_dir`). GGUF weights are dequantized by transformers (needs the ``gguf`` package)
    into ``dtype``; that dequantized model is the original the quantized one is compared with.
    A llama2.c SentencePiece model becomes a transformers tokenizer (:func:`yaqa_ext.llama2c.sentencepiece_tokenizer`);
    ``with_tokenizer=False`` gives ``(model, None)`` (a folder saved without one).
    """
    source = _resolve(name_or_path)
    checkpoint = find_llama2c_checkpoint(source) if Path(source).exists() else None
    gguf = None if checkpoint is not None or not Path(source).exists() else find_gguf(source)
    if checkpoint is not None:
        model = load_llama2c(checkpoint, dtype=dtype)
        tokenizer = sentencepiece_tokenizer(find_sentencepiece_model(checkpoint.parent)) if with_tokenizer else None
    elif gguf is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = gguf_as_hf(gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        model.name_or_path = str(gguf)
        tokenizer = AutoTokenizer.from_pretrained(folder) if with_tokenizer else None
    else:
        from transformers import AutoModelForCausalLM

        path = Path(source)
        if path.exists() and not (path.is_dir() and (path / "config.json").exists()):
            raise _not_a_model(path)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
        tokenizer = _load_tokenizer(source) if with_tokenizer else None
    return model.to(device), tokenizer


def _load_tokenizer(source: str):
    """The folder's llama2.c SentencePiece model when it has no Hugging Face tokenizer files, else AutoTokenizer."""
    folder = Path(source)
    if folder.is_dir() and not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return sentencepiece_tokenizer(find_sentencepiece_model(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)
