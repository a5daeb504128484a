"""Low-rank error reconstruction: every closed form minimises its own objective (against random,
perturbed and numerically optimised rank-k alternatives), special cases, the layer, PEFT export."""

from __future__ import annotations

import copy

import pytest
import torch

from yaqa_ext import QuantConfig, QuantizedLinear, dequantize, evaluate, export_lora, quantize
from yaqa_ext.lowrank import LOWRANK_METHODS, lowrank_correction, symmetric_sqrt

M, N, K = 7, 6, 2


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    dW = torch.randn(M, N, generator=g, dtype=torch.float64)
    X = torch.randn(40, N, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1, 1, 0.5, 0.2, 2], dtype=torch.float64)
    Y = torch.randn(30, M, generator=g, dtype=torch.float64)
    return {
        "dW": dW,
        "R": X.T @ X / 40,
        "x_abs_mean": X.abs().mean(0),
        "H_in": X.T @ X / 40 + 0.1 * torch.eye(N, dtype=torch.float64),
        "H_out": Y.T @ Y / 30,
    }


def objective(method: str, p: dict, C: torch.Tensor) -> float:
    """Each method's objective, written from its definition (ALGORITHMS.md section 7)."""
    E = p["dW"] - C
    if method == "svd":
        return float(E.square().sum())
    if method == "lqer":
        return float((E * p["x_abs_mean"]).square().sum())
    if method == "qera-approx":
        return float((E * p["R"].diagonal().sqrt()).square().sum())
    if method == "qera-exact":
        return float(torch.trace(E @ p["R"] @ E.T))
    return float(torch.trace(E @ p["H_in"] @ E.T @ p["H_out"]))


def closed_form(method: str, p: dict, rank: int = K) -> torch.Tensor:
    A, B = lowrank_correction(p["dW"], rank, method, x_abs_mean=p["x_abs_mean"], R=p["R"], H_in=p["H_in"],
                              H_out=p["H_out"])
    assert A.shape == (M, min(rank, M, N)) and B.shape == (min(rank, M, N), N)
    return A @ B


@pytest.mark.parametrize("method", LOWRANK_METHODS)
def test_closed_form_beats_random_and_perturbed_rank_k(problem, method):
    C = closed_form(method, problem)
    best = objective(method, problem, C)
    g = torch.Generator().manual_seed(1)
    A, B = lowrank_correction(problem["dW"], K, method, **{k: v for k, v in problem.items() if k != "dW"})
    for _ in range(200):
        random_C = torch.randn(M, K, generator=g, dtype=torch.float64) @ torch.randn(K, N, generator=g, dtype=torch.float64)
        assert best <= objective(method, problem, random_C)
        dA = 1e-3 * torch.randn(M, K, generator=g, dtype=torch.float64)
        dB = 1e-3 * torch.randn(K, N, generator=g, dtype=torch.float64)
        assert best <= objective(method, problem, (A + dA) @ (B + dB)) + 1e-12


@pytest.mark.parametrize("method", LOWRANK_METHODS)
def test_closed_form_matches_numerical_optimum(problem, method):
    """Brute force: gradient descent over rank-2 factors from several starts never does better."""
    best_numeric = float("inf")
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(M, K, generator=g, dtype=torch.float64, requires_grad=True)
        B = torch.randn(K, N, generator=g, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([A, B], lr=0.05)
        for _ in range(1500):
            opt.zero_grad()
            E = problem["dW"] - A @ B
            if method == "svd":
                loss = E.square().sum()
            elif method == "lqer":
                loss = (E * problem["x_abs_mean"]).square().sum()
            elif method == "qera-approx":
                loss = (E * problem["R"].diagonal().sqrt()).square().sum()
            elif method == "qera-exact":
                loss = torch.trace(E @ problem["R"] @ E.T)
            else:
                loss = torch.trace(E @ problem["H_in"] @ E.T @ problem["H_out"])
            loss.backward()
            opt.step()
        best_numeric = min(best_numeric, loss.item())
    closed = objective(method, problem, closed_form(method, problem))
    assert closed <= best_numeric * (1 + 1e-6) + 1e-9
    assert closed == pytest.approx(best_numeric, rel=1e-3)  # the optimiser finds the same optimum


def test_kl_with_identity_output_factor_is_qera_exact(problem):
    p = {**problem, "H_in": problem["R"], "H_out": torch.eye(M, dtype=torch.float64)}
    torch.testing.assert_close(closed_form("kl", p), closed_form("qera-exact", p), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("method", LOWRANK_METHODS)
def test_rank_zero_and_full_rank(problem, method):
    assert torch.equal(closed_form(method, problem, rank=0), torch.zeros(M, N, dtype=torch.float64))
    torch.testing.assert_close(closed_form(method, problem, rank=N), problem["dW"], rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(closed_form(method, problem, rank=100), problem["dW"], rtol=1e-8, atol=1e-9)


def test_symmetric_sqrt_and_eigenvalue_floor():
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    H = (Q * torch.tensor([4.0, 1, 0.25, 1e-9, 0.0], dtype=torch.float64)) @ Q.T
    S, S_inv = symmetric_sqrt(H, floor=1e-6)
    floored = (Q * torch.tensor([4.0, 1, 0.25, 4e-6, 4e-6], dtype=torch.float64)) @ Q.T  # raised to 1e-6 * max
    torch.testing.assert_close(S @ S, floored, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(S @ S_inv, torch.eye(5, dtype=torch.float64), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["lqer", "qera-approx", "qera-exact", "kl"])
def test_raw_token_sums_give_the_same_term_in_fp16_range(problem, method):
    """Collections store sums over tokens, not means: 1e9 tokens and outlier channels (rms 3000) must not change
    the product A B (the objectives are scale-free) nor push A or B beyond fp16's 65504."""
    outlier = torch.tensor([3000.0, 1, 1, 1, 1, 1], dtype=torch.float64)
    p = {**problem, "x_abs_mean": problem["x_abs_mean"] * outlier, "R": problem["R"] * outlier[:, None] * outlier}
    p["H_in"] = problem["H_in"] * outlier[:, None] * outlier
    big = {**p, "x_abs_mean": p["x_abs_mean"] * 1e9, "R": p["R"] * 1e9, "H_in": p["H_in"] * 1e9,
           "H_out": p["H_out"] * 1e9}
    A, B = lowrank_correction(big["dW"], K, method, x_abs_mean=big["x_abs_mean"], R=big["R"], H_in=big["H_in"],
                              H_out=big["H_out"])
    torch.testing.assert_close(A @ B, closed_form(method, p), rtol=1e-9, atol=1e-9)  # fp64 throughout
    assert A.abs().max() < 100 and B.abs().max() < 100, (A.abs().max(), B.abs().max())


@pytest.mark.parametrize("method", ["lqer", "qera-approx", "qera-exact", "kl"])
def test_all_zero_statistics_give_a_finite_term(problem, method):
    """A layer whose inputs were never non-zero: every correction is equally good; it must still be finite."""
    zero = {"x_abs_mean": torch.zeros(N, dtype=torch.float64), "R": torch.zeros(N, N, dtype=torch.float64),
            "H_in": torch.zeros(N, N, dtype=torch.float64), "H_out": torch.zeros(M, M, dtype=torch.float64)}
    A, B = lowrank_correction(problem["dW"], K, method, **zero)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()


def test_missing_statistics_are_named(problem):
    with pytest.raises(ValueError, match="'qera-exact' needs R"):
        lowrank_correction(problem["dW"], 2, "qera-exact")
    with pytest.raises(ValueError, match="'kl' needs H_out too"):
        lowrank_correction(problem["dW"], 2, "kl", H_in=problem["H_in"])
    with pytest.raises(ValueError, match="lowrank method must be one of"):
        lowrank_correction(problem["dW"], 2, "pca")
    with pytest.raises(ValueError, match="lowrank_method must be 'auto' or one of"):
        QuantConfig(lowrank_method="pca")


@pytest.fixture(scope="module")
def stories_setup(shared, tmp_path_factory):
    from yaqa_ext.data import corpus_texts, prepare_tokens
    from yaqa_ext.hessians import collect_hessians
    from yaqa_ext.models import load_model

    model, tokenizer = load_model(str(shared / "models" / "stories260K"))
    calib = prepare_tokens(corpus_texts("calibration"), tokenizer, 32, 128)
    root = tmp_path_factory.mktemp("lowrank")
    collect_hessians(model, calib, root / "B", sketch="B", n_seqs=32, seq_len=128, progress=False)
    collect_hessians(model, calib, root / "input", sketch="input", n_seqs=32, seq_len=128, progress=False)
    evaluation = prepare_tokens(corpus_texts("evaluation"), tokenizer, 8, 128)
    return model, root, evaluation


@pytest.mark.parametrize("method", LOWRANK_METHODS)
def test_quantized_layer_with_lowrank_term(stories_setup, method, tmp_path):
    model, root, evaluation = stories_setup
    base, corrected = copy.deepcopy(model), copy.deepcopy(model)
    quantize(base, QuantConfig(method="yaqa", bits=2), hessians=root / "B", input_moments=root / "input", progress=False)
    report = quantize(corrected, QuantConfig(method="yaqa", bits=2, lowrank_rank=8, lowrank_method=method),
                      hessians=root / "B", input_moments=root / "input", progress=False)
    assert all(r.lowrank == f"{method}:8" for r in report.layers)
    layer = corrected.model.layers[0].mlp.down_proj
    base_layer = base.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantizedLinear) and layer.lowrank_A.shape == (64, 8) and layer.lowrank_B.shape == (8, 172)
    # the same rounding; the layer adds x B^T A^T
    assert torch.equal(layer.qweight, base_layer.qweight)
    x = torch.randn(3, 172)
    expected = x.double() @ (base_layer.weight_matrix().double() + layer.lowrank_A.double() @ layer.lowrank_B.double()).T
    # fp32 Hadamard transforms, fp32 matmul and the fp32 rank-8 term, each rounded in its own order: CI's CPU
    # reached 3.3e-5 on outputs of size ~1; a wrong term or transform is off by O(1)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-4)
    assert layer.bits_per_weight() == pytest.approx(base_layer.bits_per_weight() + 16 * 8 * (64 + 172) / (64 * 172))
    kl_base = evaluate(model, base, evaluation, n_seqs=8, seq_len=128).kl
    kl_corrected = evaluate(model, corrected, evaluation, n_seqs=8, seq_len=128).kl
    assert kl_corrected < kl_base, (kl_corrected, kl_base)


def test_rank_zero_changes_nothing(stories_setup):
    model, root, _ = stories_setup
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    quantize(a, QuantConfig(method="ldlq", bits=3), hessians=root / "input", progress=False)
    quantize(b, QuantConfig(method="ldlq", bits=3, lowrank_rank=0, lowrank_method="svd"), hessians=root / "input",
             progress=False)
    assert len(list(a.named_buffers())) == len(list(b.named_buffers()))
    for (na, ma), (nb, mb) in zip(a.named_buffers(), b.named_buffers()):
        assert na == nb and torch.equal(ma, mb)


def test_save_load_and_peft_export(stories_setup, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, root, evaluation = stories_setup
    q = copy.deepcopy(model)
    quantize(q, QuantConfig(method="yaqa", bits=3, lowrank_rank=4, lowrank_method="kl"), hessians=root / "B",
             progress=False)
    q.save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    with torch.no_grad():
        ref = q(evaluation[:2]).logits
        assert torch.equal(loaded(evaluation[:2]).logits, ref)
    export_lora(q, tmp_path / "adapter")
    base = dequantize(copy.deepcopy(q), lowrank=False)
    assert not any(isinstance(m, QuantizedLinear) for m in base.modules())
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        # dense fp32 base + LoRA path vs the RHT/dequantize path: fp32 rounding only
        torch.testing.assert_close(peft_model(evaluation[:2]).logits, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no layer has a low-rank term"):
        export_lora(model, tmp_path / "none")


def test_missing_lowrank_statistics_fail_before_any_work(stories_setup, tmp_path):
    model, root, _ = stories_setup
    tokens = torch.randint(0, 512, (8, 64))
    with pytest.raises(ValueError, match="'qera-exact' needs the input statistics"):
        quantize(copy.deepcopy(model), QuantConfig(method="yaqa", lowrank_rank=4, lowrank_method="qera-exact"),
                 data=tokens, collect_dir=tmp_path / "collect", n_seqs=8, seq_len=64, progress=False)
    assert not (tmp_path / "collect").exists()  # nothing was collected
    with pytest.raises(ValueError, match="input_moments: .* is a Sketch B collection"):
        quantize(copy.deepcopy(model), QuantConfig(method="yaqa", lowrank_rank=4, lowrank_method="qera-exact"),
                 hessians=root / "B", input_moments=root / "B", progress=False)
    with pytest.raises(ValueError, match="'kl' needs YAQA's two factors"):
        quantize(copy.deepcopy(model), QuantConfig(method="datafree", lowrank_rank=4, lowrank_method="kl"),
                 progress=False)
    with pytest.raises(ValueError, match="'kl' needs YAQA's two factors"):
        quantize(copy.deepcopy(model), QuantConfig(method="ldlq", lowrank_rank=4, lowrank_method="kl"),
                 hessians=root / "input", progress=False)
