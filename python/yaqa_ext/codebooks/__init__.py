"""Codebooks: the quantisers a weight is rounded to and stored with, found by name (see :mod:`.base`)."""

from __future__ import annotations

from .base import CODEBOOKS, Codebook, Grid, get_codebook, register_codebook
from .intgrid import IntCodebook, IntGrid, gaussian_optimal_step

__all__ = ["CODEBOOKS", "Codebook", "Grid", "IntCodebook", "IntGrid", "gaussian_optimal_step", "get_codebook",
           "register_codebook"]
