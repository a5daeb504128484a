"""Atomic file writes: a reader (or a restarted run) sees the old file or the new one, never a torn one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

__all__ = ["atomic_dir", "atomic_save", "atomic_write_bytes", "atomic_write_text", "publish_files"]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors written to a temporary file, flushed, then renamed: a reader sees all or nothing."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Bytes written to a temporary file, flushed, then renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """UTF-8 text written to a temporary file, flushed, then renamed."""
    atomic_write_bytes(text.encode("utf-8"), path)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A folder filled under a temporary name beside ``path`` and renamed to ``path`` when the block ends
    without an error (removed otherwise): a reader sees the whole folder or none. If another process
    published ``path`` meanwhile, its folder is kept and this one dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_files(src: str | os.PathLike, dst: str | os.PathLike, last: str) -> None:
    """Move every file of ``src`` into ``dst``, each flushed and renamed, ``last`` after all the others (and an
    old ``last`` removed first): a reader that needs ``last`` (e.g. config.json) sees the whole new set or none."""
    src, dst = Path(src), Path(dst)
    (dst / last).unlink(missing_ok=True)
    _fsync_dir(dst)
    for f in sorted((f for f in src.iterdir() if f.is_file()), key=lambda f: f.name == last):
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(f, dst / f.name)
    _fsync_dir(dst)
