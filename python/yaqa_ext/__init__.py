"""yaqa_ext: model-preserving quantization of LLMs as PyTorch C++/CUDA operators."""

from __future__ import annotations

from . import ops
from ._C import WITH_CUDA
from .codebooks import Codebook, Grid, IntCodebook, IntGrid
from .evaluation import EvalResult, evaluate
from .hadamard import RHT, hadamard_matrix, hadamard_transform
from .hessians import collect_hessians, load_hessians
from .config import QuantConfig
from .hf import dequantize, export_lora
from .ldl import BlockLDL, block_ldl
from .ops import input_moment_update, sketch_a_update, sketch_b_update
from .qlinear import QuantizedLinear
from .quantize import QuantReport, quantize
from .rounding import Rounded, ldlq_round, proxy_loss, round_to_nearest

__version__ = "0.1.0"
__all__ = [
    "RHT",
    "WITH_CUDA",
    "BlockLDL",
    "EvalResult",
    "Codebook",
    "Grid",
    "IntCodebook",
    "IntGrid",
    "QuantConfig",
    "QuantReport",
    "QuantizedLinear",
    "Rounded",
    "__version__",
    "block_ldl",
    "collect_hessians",
    "dequantize",
    "evaluate",
    "export_lora",
    "hadamard_matrix",
    "hadamard_transform",
    "input_moment_update",
    "ldlq_round",
    "load_hessians",
    "ops",
    "proxy_loss",
    "quantize",
    "round_to_nearest",
    "sketch_a_update",
    "sketch_b_update",
]
