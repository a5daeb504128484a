"""Build the yaqa_ext._C extension: CUDA when nvcc and a CUDA build of torch are present.

Environment:
  YAQA_BUILD=auto|cpu|cuda   force a CPU-only or a CUDA build (default: auto-detect)
  TORCH_CUDA_ARCH_LIST       GPU architectures (default "8.0;9.0": A100, H100/H200)
  MAX_JOBS                   parallel compile jobs (default 2)
  YAQA_DEBUG=1               -O0 -g
"""

from __future__ import annotations

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _use_cuda() -> bool:
    mode = os.environ.get("YAQA_BUILD", "auto").lower()
    if mode not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"YAQA_BUILD must be auto, cpu or cuda, not {mode!r}")
    have_cuda = CUDA_HOME is not None and torch.version.cuda is not None
    if mode == "cuda" and not have_cuda:
        raise SystemExit(
            "YAQA_BUILD=cuda, but "
            + ("torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        )
    return mode != "cpu" and have_cuda


SANITIZE = os.environ.get("YAQA_SANITIZE") == "1"
"""YAQA_SANITIZE=1: a CPU-only build with AddressSanitizer and UndefinedBehaviorSanitizer (see .ci/sanitize)."""
SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]


def _openmp_link_args() -> list[str]:
    """Link torch's own OpenMP runtime (torch/lib/libgomp*.so*, under whatever name this torch ships it), so the
    extension's parallel regions and torch's share one runtime and one thread count; the system's libgomp only
    when torch bundles none."""
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    bundled = sorted(glob.glob(os.path.join(lib, "libgomp*.so*")))
    if not bundled:
        return ["-fopenmp"]
    return [f"-L{lib}", f"-l:{os.path.basename(bundled[0])}", "-Wl,-rpath,$ORIGIN/../torch/lib", f"-Wl,-rpath,{lib}"]


def _extension():
    debug = os.environ.get("YAQA_DEBUG") == "1"
    opt = ["-O1", "-g", *SANITIZER_FLAGS] if SANITIZE else ["-O0", "-g"] if debug else ["-O3"]
    # OpenMP: at::parallel_for in the CPU kernels runs its chunks on torch's threads (without it, in one thread);
    # linked against torch's own libgomp (_openmp_link_args).
    cxx = [*opt, "-std=c++17", "-fopenmp", "-DPy_LIMITED_API=0x030A0000"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if SANITIZE or not _use_cuda():
        print("yaqa_ext: building the CPU-only extension" + (" with ASan and UBSan" if SANITIZE else ""))
        return CppExtension("yaqa_ext._C", sources, extra_compile_args={"cxx": cxx}, py_limited_api=True,
                            extra_link_args=[*_openmp_link_args(), *(SANITIZER_FLAGS if SANITIZE else [])])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    print(f"yaqa_ext: building with CUDA {torch.version.cuda} for arch {os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    nvcc = [*opt, "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    return CUDAExtension(
        "yaqa_ext._C",
        sources,
        define_macros=[("YAQA_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        # libtorch_cuda_linalg holds ATen's cuSOLVER handle pool; torch loads it lazily, so the
        # extension finds it through an rpath to torch/lib (installed or editable layout).
        libraries=["cublas", "cusolver", "torch_cuda_linalg"],
        extra_link_args=[*_openmp_link_args(), *(f"-Wl,-rpath,{p}" for p in (
            "$ORIGIN/../torch/lib", os.path.join(os.path.dirname(torch.__file__), "lib")))],
        py_limited_api=True,
    )


class _BuildExt(BuildExtension):
    """One object cache (build/temp) for `setup.py build_ext --inplace` and `pip install -e .`, which
    would otherwise compile everything again in a throw-away folder."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp-sanitize" if SANITIZE else "temp")


os.environ.setdefault("MAX_JOBS", "2")
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExt.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
