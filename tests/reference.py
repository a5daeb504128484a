"""Plain-PyTorch reference implementations the ops are tested against (fp64, written for clarity)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def block_ldl_reference(H: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """Block LDL by Schur complements (no Cholesky): returns unit L (n x n) and D (n/b, b, b)."""
    S = H.double().clone()
    n = S.size(0)
    L = torch.eye(n, dtype=torch.float64)
    D = []
    for k in range(0, n, b):
        Dk = S[k : k + b, k : k + b].clone()
        D.append(Dk)
        below = S[k + b :, k : k + b]
        Lk = torch.linalg.solve(Dk, below.T).T  # below @ Dk^{-1}
        L[k + b :, k : k + b] = Lk
        S[k + b :, k + b :] -= Lk @ Dk @ Lk.T
    return L, torch.stack(D)


def spd_matrix(n: int, cond: float, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """A random symmetric positive definite matrix with eigenvalues log-spaced in [1/cond, 1]."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, -torch.log10(torch.tensor(cond, dtype=torch.float64)).item(), n, dtype=torch.float64)
    H = (Q * eig) @ Q.T
    return ((H + H.T) / 2).to(dtype)


def first_failing_minor(H: Tensor) -> int:
    """Brute force: the order of the first leading minor that is not positive definite (0 if none)."""
    Hd = H.double()
    for k in range(1, Hd.size(0) + 1):
        if torch.linalg.eigvalsh(Hd[:k, :k]).min() <= 0:
            return k
    return 0


def llama2c_reference_logits(checkpoint, tokens: list[int]) -> Tensor:
    """llama2.c's run.c forward (interleaved RoPE, GQA, tied classifier) in fp64, read with numpy."""
    import numpy as np

    raw = np.fromfile(checkpoint, dtype=np.uint8)
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = (int(v) for v in raw[:28].view(np.int32))
    w = torch.from_numpy(raw[28:].view(np.float32).astype(np.float64))
    hs, kv_dim = dim // n_heads, dim // n_heads * n_kv
    off = 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        out = w[off : off + n].view(*shape)
        off += n
        return out

    emb = take(abs(vocab), dim)
    rms_att, wq, wk, wv = take(n_layers, dim), take(n_layers, dim, dim), take(n_layers, kv_dim, dim), take(n_layers, kv_dim, dim)
    wo, rms_ffn = take(n_layers, dim, dim), take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    rms_final = take(dim)
    take(seq_len, hs // 2)
    take(seq_len, hs // 2)
    wcls = emb if vocab > 0 else take(abs(vocab), dim)

    def rmsnorm(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * g

    def rope(x, n):  # x: (T, n*hs); rotate pairs (2i, 2i+1) of each head by pos * 10000^(-2i/hs)
        T = x.shape[0]
        x = x.view(T, n, hs // 2, 2)
        freq = 1.0 / 10000.0 ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]
        c, s = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
        a, b = x[..., 0], x[..., 1]
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).view(T, n * hs)

    T = len(tokens)
    x = emb[torch.tensor(tokens)]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for layer in range(n_layers):
        xb = rmsnorm(x, rms_att[layer])
        q = rope(xb @ wq[layer].T, n_heads).view(T, n_heads, hs)
        k = rope(xb @ wk[layer].T, n_kv).view(T, n_kv, hs)
        v = (xb @ wv[layer].T).view(T, n_kv, hs)
        rep = n_heads // n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = torch.einsum("thd,shd->hts", q, k) / hs**0.5 + mask
        out = torch.einsum("hts,shd->thd", att.softmax(-1), v).reshape(T, dim)
        x = x + out @ wo[layer].T
        xb = rmsnorm(x, rms_ffn[layer])
        x = x + (torch.nn.functional.silu(xb @ w1[layer].T) * (xb @ w3[layer].T)) @ w2[layer].T
    return rmsnorm(x, rms_final) @ wcls.T


def strictly_block_lower(L: Tensor, b: int) -> Tensor:
    """L with its diagonal b x b blocks and everything above them set to zero."""
    n = L.size(0)
    blk = torch.arange(n) // b
    return torch.where(blk[:, None] > blk[None, :], L, torch.zeros_like(L))


def tile_ldlq_reference(W: Tensor, L_in: Tensor | None, L_out: Tensor | None, td_x: int, td_y: int,
                        round_tile: Callable[[Tensor, slice, slice], tuple[Tensor, Tensor]],
                        code_shape: tuple[int, int], code_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The two-sided tile rule written naively for any codebook: tiles in anti-diagonal wavefronts from the
    bottom-right, each tile's feedback E L_in + L_out^T E + L_out^T E L_in recomputed from full products in
    fp64, then ``round_tile(x, rows, cols) -> (values, codes)`` of the tile's fp32 target; codes of a tile
    are written at ``codes[rows, cols // (n / code_shape[1])]`` scaled to the codes' shape."""
    m, n = W.shape
    Li = torch.zeros(n, n, dtype=torch.float64) if L_in is None else strictly_block_lower(L_in.double(), td_y)
    Lo = torch.zeros(m, m, dtype=torch.float64) if L_out is None else strictly_block_lower(L_out.double(), td_x)
    per_code = n // code_shape[1]
    E = torch.zeros(m, n, dtype=torch.float64)
    W_hat = torch.zeros(m, n, dtype=torch.float32)
    codes = torch.zeros(code_shape, dtype=code_dtype)
    mt, nt = m // td_x, n // td_y
    for w in range(mt + nt - 2, -1, -1):
        for i in range(mt):
            j = w - i
            if not 0 <= j < nt:
                continue
            rows, cols = slice(i * td_x, (i + 1) * td_x), slice(j * td_y, (j + 1) * td_y)
            F = E @ Li + Lo.T @ E + Lo.T @ E @ Li
            x = (W[rows, cols].double() + F[rows, cols]).float()
            W_hat[rows, cols], codes[rows, cols.start // per_code:cols.stop // per_code] = round_tile(x, rows, cols)
            E[rows, cols] = W[rows, cols].double() - W_hat[rows, cols].double()
    return W_hat, codes


def ldlq_reference(W: Tensor, L_in: Tensor | None, L_out: Tensor | None, scales: Tensor, zeros: Tensor, bits: int,
                   group_size: int, td_x: int, td_y: int) -> tuple[Tensor, Tensor]:
    """:func:`tile_ldlq_reference` on the INT grid ``clamp(round(x / s + z), 0, 2^bits - 1)``."""
    s = scales.repeat_interleave(group_size, 1)
    z = zeros.repeat_interleave(group_size, 1)

    def round_tile(x: Tensor, rows: slice, cols: slice) -> tuple[Tensor, Tensor]:
        q = torch.round(x / s[rows, cols] + z[rows, cols]).clamp(0, 2**bits - 1)
        return (q - z[rows, cols]) * s[rows, cols], q.to(torch.uint8)

    return tile_ldlq_reference(W, L_in, L_out, td_x, td_y, round_tile, tuple(W.shape), torch.uint8)


def gptq_reference(W: Tensor, H: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int) -> Tensor:
    """Classic GPTQ (upper Cholesky factor of H^-1, error propagated column by column), run on the
    columns in reverse order, the order one-sided LDLQ uses. Returns the codes."""
    n = W.size(1)
    rev = torch.arange(n - 1, -1, -1)
    Hr = H.double()[rev][:, rev]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hr)), upper=True)
    Wr = W.double()[:, rev].clone()
    s = scales.repeat_interleave(group_size, 1)[:, rev]
    z = zeros.repeat_interleave(group_size, 1)[:, rev]
    codes = torch.zeros(W.shape, dtype=torch.uint8)
    for i in range(n):
        q = torch.round(Wr[:, i].float() / s[:, i] + z[:, i]).clamp(0, 2**bits - 1)
        codes[:, rev[i]] = q.to(torch.uint8)
        err = (Wr[:, i] - ((q - z[:, i]) * s[:, i]).double()) / U[i, i]
        Wr[:, i + 1 :] -= err[:, None] * U[i, i + 1 :][None, :]
    return codes


def native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether the CPU multiplies ``dtype`` natively (Linux CPU flags avx512_bf16 / avx512_fp16), where the CPU
    quantized matmuls' large-batch path runs its GEMM in the activations' half precision."""
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return False
    return {torch.bfloat16: "avx512_bf16", torch.float16: "avx512_fp16"}.get(dtype) in flags


def quantized_matmul_reference(x: Tensor, W_hat: Tensor, rht=None, gemm_dtype: torch.dtype | None = None) -> Tensor:
    """``x W_hat^T`` (with an RHT: ``output_inverse(input_transform(x) W_hat^T)``) in fp64; with ``gemm_dtype`` the
    product as a half-precision GEMM computes it: its (transformed) activations and the weights rounded to that
    dtype, exact sums, the product rounded to it before the output transform."""
    xt = x.double() if rht is None else rht.input_transform(x.double())
    W = W_hat.double()
    if gemm_dtype is not None:
        xt, W = xt.to(gemm_dtype).double(), W.to(gemm_dtype).double()
    y = xt @ W.T
    if gemm_dtype is not None:
        y = y.to(gemm_dtype).double()
    return y if rht is None else rht.output_inverse(y)
