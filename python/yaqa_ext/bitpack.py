"""Bit streams: k-bit codes packed little-endian along each row, 8 codes to k bytes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pack_codes", "unpack_codes"]


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes (m, n) < 2^bits as a little-endian bit stream per row: (m, ceil(n / 8) * bits) bytes."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    m, n = codes.shape
    padded = F.pad(codes, (0, -n % 8))
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = (padded.unsqueeze(-1) >> shifts) & 1  # (m, n8, bits)
    stream = stream.reshape(m, -1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=codes.device)
    return (stream * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_codes`: the (m, n) uint8 codes."""
    m = packed.size(0)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(m, -1, bits)
    weights = (1 << torch.arange(bits, device=packed.device)).to(torch.int32)
    return (stream.to(torch.int32) * weights).sum(-1)[:, :n].to(torch.uint8)
