"""Orthonormal Hadamard transforms ``y = (Had_{2^k} ⊗ Had_c) x / sqrt(n)`` and the random Hadamard transform (RHT)."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from . import ops

__all__ = ["RHT", "SUPPORTED_C", "hadamard_factor", "hadamard_matrix", "hadamard_transform", "small_hadamard"]

# Goethals-Seidel constructions: order c = 4n from four circulant +-1 sequences of length n whose
# periodic autocorrelations sum to zero off the origin. Each sequence is -1 exactly on a union of
# orbits of the multiplicative group <g> acting on Z_n (orbits listed by their smallest element,
# in increasing order); bit i of a mask selects orbit i. The masks were found by an exhaustive
# meet-in-the-middle search over such unions (row-sum and spectral-density pruning for n = 29,
# where <g> = {1, -1} makes the sequences symmetric, i.e. Williamson matrices); the tests check
# H H^T = c I for every order.
_GOETHALS_SEIDEL: dict[int, tuple[int, tuple[int, int, int, int]]] = {
    7: (2, (1, 2, 3, 5)),
    9: (8, (2, 3, 13, 18)),
    13: (3, (2, 6, 11, 13)),
    29: (28, (29237, 13845, 918, 14408)),
    31: (2, (6, 22, 44, 50)),
    39: (5, (31, 31, 910, 1566)),
    43: (4, (7, 14, 26, 88)),
}
# Paley I: order q + 1 for a prime q = 3 (mod 4).
_PALEY_PRIMES = {11, 19, 59, 107, 139}

SUPPORTED_C = tuple(sorted([q + 1 for q in _PALEY_PRIMES] + [4 * n for n in _GOETHALS_SEIDEL]))
"""Orders c > 1 of the built-in small Hadamard matrices (40 = 2 * 20 is covered by the 2^k factor)."""


def _orbits(n: int, g: int) -> list[list[int]]:
    seen: set[int] = set()
    orbits = []
    for x in range(n):
        if x in seen:
            continue
        orbit, y = [], x
        while y not in orbit:
            orbit.append(y)
            y = y * g % n
        seen.update(orbit)
        orbits.append(orbit)
    return orbits


def _circulant(row: Tensor) -> Tensor:
    n = row.numel()
    idx = (torch.arange(n)[None, :] - torch.arange(n)[:, None]) % n
    return row[idx]


def _goethals_seidel(n: int) -> Tensor:
    g, masks = _GOETHALS_SEIDEL[n]
    orbits = _orbits(n, g)
    rows = []
    for mask in masks:
        row = torch.ones(n, dtype=torch.float64)
        for i, orbit in enumerate(orbits):
            if mask >> i & 1:
                row[orbit] = -1.0
        rows.append(row)
    A, B, C, D = (_circulant(r) for r in rows)
    R = torch.eye(n, dtype=torch.float64).flip(1)
    return torch.cat(
        [
            torch.cat([A, B @ R, C @ R, D @ R], 1),
            torch.cat([-B @ R, A, D.T @ R, -C.T @ R], 1),
            torch.cat([-C @ R, -D.T @ R, A, B.T @ R], 1),
            torch.cat([-D @ R, C.T @ R, -B.T @ R, A], 1),
        ],
        0,
    )


def _paley1(q: int) -> Tensor:
    residues = {x * x % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if x in residues else -1.0 for x in range(1, q)], dtype=torch.float64)
    Q = _circulant(chi)  # Q[i, j] = chi(j - i), antisymmetric for q = 3 mod 4
    H = torch.empty(q + 1, q + 1, dtype=torch.float64)
    H[0, :] = 1.0
    H[1:, 0] = -1.0
    H[1:, 1:] = Q + torch.eye(q, dtype=torch.float64)
    return H


@functools.cache
def small_hadamard(c: int) -> Tensor:
    """A c x c matrix of +-1 with ``H H^T = c I`` for c in :data:`SUPPORTED_C` (fp64, CPU)."""
    if c - 1 in _PALEY_PRIMES:
        return _paley1(c - 1)
    if c % 4 == 0 and c // 4 in _GOETHALS_SEIDEL:
        return _goethals_seidel(c // 4)
    raise ValueError(f"no built-in Hadamard matrix of order {c}; built-in orders: {SUPPORTED_C}")


def hadamard_factor(n: int) -> tuple[int, int]:
    """``(2^k, c)`` with ``n = 2^k * c`` and c = 1 or in :data:`SUPPORTED_C`; a clear error otherwise."""
    if n >= 1:
        k = (n & -n).bit_length() - 1  # power of two in n
        odd = n >> k
        if odd == 1:
            return n, 1
        if k >= 2 and 4 * odd in SUPPORTED_C:
            return n // (4 * odd), 4 * odd
    raise ValueError(
        f"no Hadamard transform of size {n}: supported sizes are 2^k and 2^k * c with k >= 0 and "
        f"c in {{{', '.join(map(str, SUPPORTED_C))}}} (e.g. 4096, 11008 = 64 * 172, 14336 = 512 * 28)"
    )


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Tensor:
    """The dense orthonormal ``(Had_{2^k} ⊗ Had_c) / sqrt(n)`` that :func:`hadamard_transform` applies."""
    p, c = hadamard_factor(n)
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.size(0) < p:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0)
    small = small_hadamard(c) if c > 1 else torch.ones(1, 1, dtype=torch.float64)
    return (torch.kron(sylvester, small) / math.sqrt(n)).to(dtype=dtype, device=device)


@functools.cache
def _small_factor(c: int, transpose: bool, device: torch.device) -> Tensor | None:
    if c == 1:
        return None
    h = small_hadamard(c)
    return (h.T if transpose else h).contiguous().to(dtype=torch.float32, device=device)


def hadamard_transform(x: Tensor, inverse: bool = False) -> Tensor:
    """``y = Had x`` (``Had^T x`` if inverse) along the last dimension, orthonormal; keeps dtype and device.

    ``x`` is float32, float16 or bfloat16 (computed in fp32); its last dimension must be a
    supported size (see :func:`hadamard_factor`).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"hadamard_transform: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("hadamard_transform: x must have at least one dimension")
    _, c = hadamard_factor(x.size(-1))
    return ops.hadamard_transform(x, _small_factor(c, inverse, x.device))


class RHT:
    """Random Hadamard transform of an m x n layer (ALGORITHMS.md section 4), seeded and invertible.

    ``W~ = Had_m S_V W S_U Had_n^T``, ``H_I~ = Had_n S_U H_I S_U Had_n^T``,
    ``H_O~ = Had_m S_V H_O S_V Had_m^T`` with random sign vectors ``S_U`` (n) and ``S_V`` (m); the
    proxy loss ``tr(dW H_I dW^T H_O)`` is unchanged. For activations ``x W^T = f(x) W~^T`` mapped
    back by :meth:`output_inverse`, where ``f = input_transform``.
    """

    def __init__(self, out_features: int, in_features: int, seed: int = 0, device: str | torch.device = "cpu") -> None:
        hadamard_factor(out_features)
        hadamard_factor(in_features)
        g = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.sign_in = (torch.randint(0, 2, (in_features,), generator=g) * 2 - 1).float().to(device)
        self.sign_out = (torch.randint(0, 2, (out_features,), generator=g) * 2 - 1).float().to(device)

    @classmethod
    def from_signs(cls, sign_out: Tensor, sign_in: Tensor, seed: int = 0) -> RHT:
        """An RHT with given +-1 sign vectors (e.g. stored in a quantized layer)."""
        hadamard_factor(sign_out.numel())
        hadamard_factor(sign_in.numel())
        rht = cls.__new__(cls)
        rht.seed, rht.sign_in, rht.sign_out = seed, sign_in.float(), sign_out.float()
        return rht

    def fused_args(self, device: torch.device) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """``(sign_in, had_in, sign_out, had_out)`` on ``device``: the arguments that make an op (e.g.
        :func:`yaqa_ext.ops.int_matmul`) apply :meth:`input_transform` before and :meth:`output_inverse` after.
        Kept for the last device (a quantized layer calls this on every forward; at decode it cost as much as the
        transforms themselves)."""
        cached = self.__dict__.get("_fused_args")
        if cached is None or cached[0] != device:
            c_in, c_out = hadamard_factor(self.sign_in.numel())[1], hadamard_factor(self.sign_out.numel())[1]
            cached = self.__dict__["_fused_args"] = (device, (
                self.sign_in.to(device), _small_factor(c_in, False, device), self.sign_out.to(device),
                _small_factor(c_out, True, device)))
        return cached[1]

    def _signs(self, t: Tensor, what: str, shape: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        """The sign vectors in ``t``'s dtype and device, once ``t`` has the shape the RHT needs: ``shape`` of
        'm' / 'n' (this layer's output / input size), a matrix exactly, a vector as the last dimension of a
        batch. A wrong shape would otherwise broadcast against the signs into a wrong result."""
        sizes = {"m": self.sign_out.numel(), "n": self.sign_in.numel()}
        want = tuple(sizes[d] for d in shape)
        ok = tuple(t.shape) == want if len(want) == 2 else t.dim() >= 1 and t.shape[-1] == want[0]
        if not ok:
            need = f"({want[0]}, {want[1]})" if len(want) == 2 else f"(..., {want[0]})"
            raise ValueError(f"RHT of a {sizes['m']} x {sizes['n']} layer: {what} must have shape {need}, "
                             f"got {tuple(t.shape)}")
        return self.sign_in.to(device=t.device, dtype=t.dtype), self.sign_out.to(device=t.device, dtype=t.dtype)

    def transform_weight(self, W: Tensor) -> Tensor:
        s_in, s_out = self._signs(W, "W", ("m", "n"))
        rows = hadamard_transform(W * s_in)  # (W S_U) Had_n^T
        return hadamard_transform((rows * s_out[:, None]).T).T  # Had_m S_V (...)

    def inverse_weight(self, Wt: Tensor) -> Tensor:
        s_in, s_out = self._signs(Wt, "Wt", ("m", "n"))
        cols = hadamard_transform(Wt.T, inverse=True).T * s_out[:, None]  # S_V Had_m^T W~
        return hadamard_transform(cols, inverse=True) * s_in  # (...) Had_n S_U

    def _factor(self, H: Tensor, signs: Tensor) -> Tensor:
        signed = H * signs[:, None] * signs[None, :]
        return hadamard_transform(hadamard_transform(signed).T).T

    def transform_input_factor(self, H_in: Tensor) -> Tensor:
        return self._factor(H_in, self._signs(H_in, "H_in", ("n", "n"))[0])

    def transform_output_factor(self, H_out: Tensor) -> Tensor:
        return self._factor(H_out, self._signs(H_out, "H_out", ("m", "m"))[1])

    def input_transform(self, x: Tensor) -> Tensor:
        """``x S_U Had_n^T`` along the last dimension: the input of the transformed layer."""
        return hadamard_transform(x * self._signs(x, "x", ("n",))[0])

    def output_inverse(self, y: Tensor) -> Tensor:
        """``y Had_m S_V`` along the last dimension: the original layer's output from the transformed one."""
        return hadamard_transform(y, inverse=True) * self._signs(y, "y", ("m",))[1]
