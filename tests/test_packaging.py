"""Packaging: `python -m build` makes an sdist holding every source and a wheel holding the compiled
extension; a fresh virtual environment installs the wheel (its requirements met by what is already
installed, nothing downloaded) and runs the quick start from outside the repository (slow: a CPU-only
compile of the extension: 96 s in all on 2 cores)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["csrc", "python", "tests", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "CMakeLists.txt"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    pytest.importorskip("build")
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    env = {**os.environ, "YAQA_BUILD": "cpu", "MAX_JOBS": "2"}
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(src / "dist"), str(src)], src, env)
    return src / "dist"


def test_sdist_holds_every_source(dist):
    (sdist,) = dist.glob("yaqa_ext-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert expected <= names, sorted(expected - names)
    assert {"setup.py", "pyproject.toml", "CMakeLists.txt", "tests/conftest.py", "python/yaqa_ext/__init__.py"} <= names


def test_wheel_installs_in_a_fresh_venv_and_runs_the_quick_start(dist, tmp_path, shared):
    (wheel,) = dist.glob("yaqa_ext-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert "yaqa_ext/_C.abi3.so" in names and "yaqa_ext/codebooks/__init__.py" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # An existing environment: torch, transformers, ... visible through a path entry (its .pth files, and so
    # this checkout's editable yaqa_ext, are not read from there).
    (site / "existing.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"YAQA_SHARED": str(shared), "YAQA_CACHE": str(tmp_path / "cache")}
    _run([str(py), "-m", "pip", "install", "--no-index", "--disable-pip-version-check", str(wheel)], tmp_path, env)
    where = _run([str(py), "-c", "import yaqa_ext; print(yaqa_ext.__file__, yaqa_ext.__version__)"], tmp_path, env)
    assert where.startswith(str(site / "yaqa_ext")), where
    yaqa = str(venv / "bin" / "yaqa")
    _run([yaqa, "quantize", "--method", "rtn", "--bits", "4", "--out", "q4"], tmp_path, env)
    evaluation = ["eval", "--quant", "q4", "--n-seqs", "8", "--seq-len", "64"]
    installed = _run([yaqa, *evaluation], tmp_path, env)
    # the same command through this checkout's build gives the same numbers
    in_tree = subprocess.run([sys.executable, "-m", "yaqa_ext.cli", *evaluation], cwd=tmp_path, capture_output=True,
                             text=True, env={**os.environ, "YAQA_SHARED": str(shared)})
    assert in_tree.returncode == 0, in_tree.stderr
    assert installed.startswith("KL(orig || quant) = ") and installed == in_tree.stdout, (installed, in_tree.stdout)
