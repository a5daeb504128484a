"""Codebooks: the quantisers a weight is rounded to and stored with, found by name (see :mod:`.base`)."""

from __future__ import annotations

from .base import CODEBOOKS, Codebook, Grid, get_codebook, register_codebook
from .e8p import E8PCodebook, E8PGrid, e8p_abs_grid, e8p_gaussian_scales
from .intgrid import IntCodebook, IntGrid, gaussian_optimal_step
from .trellis import TrellisCodebook, TrellisGrid, trellis_table

__all__ = ["CODEBOOKS", "Codebook", "E8PCodebook", "E8PGrid", "Grid", "IntCodebook", "IntGrid", "e8p_abs_grid",
           "e8p_gaussian_scales", "gaussian_optimal_step", "get_codebook", "register_codebook", "TrellisCodebook",
           "TrellisGrid", "trellis_table"]
