"""The shrinkage estimator of Sketch B (yaqa_ext.shrinkage): the per-token parts against loops over tokens, the
weight against the centred per-sequence formula and against known truths, and a 'B-lw' collection against
explicit per-sequence gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_hessians import assert_factor_close, per_sequence_gradients, per_token_activations

from yaqa_ext.hessians import collect_hessians, load_hessians
from yaqa_ext.shrinkage import shrink, shrinkage_weight, token_parts

N_SEQS, SEQ_LEN = 6, 5


def _psd(n: int, g: torch.Generator) -> torch.Tensor:
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return A @ A.T / n


@pytest.mark.parametrize("weighted", [False, True])
def test_token_parts_equal_the_loop_over_tokens(weighted):
    """D_in = sum_t (g_t^T P_out g_t) x_t x_t^T and D_out = sum_t (x_t^T P_in x_t) g_t g_t^T."""
    g = torch.Generator().manual_seed(0)
    X, G = torch.randn(9, 6, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    P_in, P_out = (_psd(6, g), _psd(4, g)) if weighted else (None, None)
    D_in, D_out = token_parts(X, G, P_in, P_out, torch.float64)
    I_in, I_out = torch.eye(6, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    Pi, Po = (P_in, P_out) if weighted else (I_in, I_out)
    ref_in = sum((G[t] @ Po @ G[t]) * torch.outer(X[t], X[t]) for t in range(9))
    ref_out = sum((X[t] @ Pi @ X[t]) * torch.outer(G[t], G[t]) for t in range(9))
    torch.testing.assert_close(D_in, ref_in, rtol=1e-12, atol=1e-12)  # fp64 throughout
    torch.testing.assert_close(D_out, ref_out, rtol=1e-12, atol=1e-12)


def _centred_weight(S: list[torch.Tensor], D: list[torch.Tensor]) -> float:
    """lam = Cov(C_mean, S_mean) / ||C_mean||^2 written with centred samples (the textbook form)."""
    N = len(S)
    C = [s - d for s, d in zip(S, D)]
    S_mean, C_mean = sum(S) / N, sum(C) / N
    cov = sum(((c - C_mean) * (s - S_mean)).sum() for c, s in zip(C, S)) / (N * (N - 1))
    return float(min(1.0, max(0.0, cov / (C_mean * C_mean).sum())))


def _samples(N: int, signal: float, noise: float, g: torch.Generator, n: int = 8):
    """S_b = D_b + C_b: a per-token part near a fixed PSD matrix, and a cross part ``signal * M`` plus
    symmetric noise; the truth is E[S_b] = D0 + signal * M."""
    D0, M = _psd(n, g), _psd(n, g) - torch.eye(n, dtype=torch.float64)
    S, D = [], []
    for _ in range(N):
        d = D0 + 0.05 * _psd(n, g)
        E = torch.randn(n, n, generator=g, dtype=torch.float64)
        S.append(d + signal * M + noise * (E + E.T))
        D.append(d)
    truth = D0 + 0.05 * torch.eye(n, dtype=torch.float64) + signal * M  # E[A A^T / n] = I
    return S, D, truth


def test_weight_matches_the_centred_formula():
    g = torch.Generator().manual_seed(1)
    for signal, noise in ((0.0, 0.3), (1.0, 0.3), (1.0, 0.02)):
        S, D, _ = _samples(10, signal, noise, g)
        cov = float(sum(((s - d) * s).sum() for s, d in zip(S, D)))
        lam = shrinkage_weight(sum(S), sum(D), cov, len(S))
        assert lam == pytest.approx(_centred_weight(S, D), abs=1e-12)


def test_weight_follows_the_noise_and_lowers_the_error():
    """Pure-noise cross terms: lam near 1 and a smaller error than the raw mean; well-estimated cross terms
    (little noise, many sequences): lam near 0, the estimate unchanged."""
    g = torch.Generator().manual_seed(2)
    lams, raw_err, shrunk_err = [], 0.0, 0.0
    for _ in range(40):
        S, D, truth = _samples(8, 0.0, 0.3, g)
        total, token = sum(S), sum(D)
        lam = shrinkage_weight(total, token, float(sum(((s - d) * s).sum() for s, d in zip(S, D))), 8)
        lams.append(lam)
        raw_err += float((total / 8 - truth).square().sum())
        shrunk_err += float((shrink(total, token, lam) / 8 - truth).square().sum())
    assert sum(lams) / len(lams) > 0.7, lams
    assert shrunk_err < 0.5 * raw_err, (shrunk_err, raw_err)
    S, D, _ = _samples(200, 1.0, 0.02, g)
    lam = shrinkage_weight(sum(S), sum(D), float(sum(((s - d) * s).sum() for s, d in zip(S, D))), 200)
    assert lam < 0.01, lam


def test_weight_edge_cases():
    H = torch.eye(3)
    assert shrinkage_weight(H, H, 0.0, 4) == 0.0  # no cross-token terms at all
    with pytest.raises(ValueError, match="at least 2 sequences"):
        shrinkage_weight(2 * H, H, 1.0, 1)
    torch.testing.assert_close(shrink(3 * H, H, 0.25), 2.5 * H)  # H + 0.75 * (3H - H), exact in fp32


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (N_SEQS, SEQ_LEN), generator=torch.Generator().manual_seed(3))


def test_b_lw_collection_against_per_sequence_gradients(tmp_path, tokens):
    """Its raw factors are Sketch B's, its statistics those of explicit gradients and activations, and load()
    shrinks each factor by the weight of the centred formula."""
    model = tiny_model("llama", torch.float64)
    collect_hessians(model, tokens, tmp_path, sketch="B-lw", n_seqs=N_SEQS, seq_len=SEQ_LEN, batch_size=4,
                     accum_dtype=torch.float64, progress=False)
    h = load_hessians(tmp_path)
    grads = per_sequence_gradients(model, tokens)
    acts = per_token_activations(model, tokens, seed=0, round_index=0)
    for name in list(grads)[:5]:
        X, G = (a.reshape(N_SEQS, SEQ_LEN, -1) for a in acts[name])
        S_in = [gw.T @ gw for gw in grads[name]]
        S_out = [gw @ gw.T for gw in grads[name]]
        D_in = [(Xb * (Gb * Gb).sum(-1, keepdim=True)).T @ Xb for Xb, Gb in zip(X, G)]
        D_out = [(Gb * (Xb * Xb).sum(-1, keepdim=True)).T @ Gb for Xb, Gb in zip(X, G)]
        raw = h._read(name, "cpu", ("H_in", "H_out", "H_in.token", "H_out.token", "H_in.cov", "H_out.cov"))
        for got, want in zip(raw[:4], (sum(S_in), sum(S_out), sum(D_in), sum(D_out))):
            assert_factor_close(got, want)
        for got, S, D in ((raw[4], S_in, D_in), (raw[5], S_out, D_out)):
            want = float(sum(((s - d) * s).sum() for s, d in zip(S, D)))
            assert float(got) == pytest.approx(want, rel=1e-4)  # the tolerance of assert_factor_close
        lam_in, lam_out = h.shrinkage(name)
        assert lam_in == pytest.approx(_centred_weight(S_in, D_in), abs=1e-3)
        assert lam_out == pytest.approx(_centred_weight(S_out, D_out), abs=1e-3)
        H_in, H_out = h.load(name)
        assert_factor_close(H_in, sum(D_in) + (1 - lam_in) * (sum(S_in) - sum(D_in)))
        assert_factor_close(H_out, sum(D_out) + (1 - lam_out) * (sum(S_out) - sum(D_out)))


def test_b_lw_resumes_and_refuses_other_sketches(tmp_path, tokens):
    """An interrupted 'B-lw' collection resumes to the uninterrupted statistics; shrinkage() of a plain
    Sketch B collection says what to collect."""
    kw = dict(sketch="B-lw", n_seqs=N_SEQS, seq_len=SEQ_LEN, batch_size=1, progress=False)
    model = tiny_model("llama")
    calls = []

    def fail(*_):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt

    handle = model.register_forward_hook(fail)
    with pytest.raises(KeyboardInterrupt):
        collect_hessians(model, tokens, tmp_path / "a", checkpoint_interval=0.0, **kw)
    handle.remove()
    collect_hessians(model, tokens, tmp_path / "a", **kw)
    collect_hessians(tiny_model("llama"), tokens, tmp_path / "b", **kw)
    a, b = load_hessians(tmp_path / "a"), load_hessians(tmp_path / "b")
    for name in a.modules:
        assert a.shrinkage(name) == b.shrinkage(name)
        for x, y in zip(a.load(name), b.load(name)):
            assert torch.equal(x, y)
    collect_hessians(tiny_model("llama"), tokens, tmp_path / "plain", sketch="B", n_seqs=N_SEQS, seq_len=SEQ_LEN,
                     progress=False)
    with pytest.raises(ValueError, match="sketch='B-lw'"):
        load_hessians(tmp_path / "plain").shrinkage(a.modules[0])
    with pytest.raises(ValueError, match="n_seqs must be >= 2"):  # before any pass over the data
        collect_hessians(tiny_model("llama"), tokens, tmp_path / "one", sketch="B-lw", n_seqs=1, seq_len=SEQ_LEN)
