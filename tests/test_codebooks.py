"""Quantiser grids: scales and zero points against their definitions, the Gaussian-optimal step
against the published values (Max 1960), round trips."""

from __future__ import annotations

import pytest
import torch

from yaqa_ext import IntCodebook, round_to_nearest
from yaqa_ext.codebooks import gaussian_optimal_step


@pytest.mark.parametrize(("bits", "published"), [(2, 0.9957), (3, 0.5860), (4, 0.3352)])
def test_gaussian_optimal_step_matches_max_1960(bits, published):
    assert gaussian_optimal_step(bits) == pytest.approx(published, abs=2e-4)


def test_tensor_symmetric_scale_without_search_is_rms_times_step():
    W = torch.randn(32, 64)
    p = IntCodebook(3, granularity="tensor", search=False).fit(W)
    assert p.scales.shape == (32, 1) and p.group_size == 64
    expected = W.double().square().mean().sqrt() * gaussian_optimal_step(3)
    torch.testing.assert_close(p.scales, torch.full((32, 1), float(expected)), rtol=2**-11, atol=0)  # fp16 rounding
    assert torch.all(p.zeros == 3.5)


def test_channel_symmetric_without_search_covers_absmax():
    W = torch.randn(8, 16)
    p = IntCodebook(4, granularity="channel", search=False).fit(W)
    torch.testing.assert_close(p.scales[:, 0], W.abs().amax(1) / 7.5, rtol=2**-11, atol=0)
    W_hat, codes = round_to_nearest(W, p)
    # the row's largest magnitude sits on the outermost level of its grid
    r = torch.arange(8)
    assert torch.allclose(W_hat.abs()[r, W.abs().argmax(1)], W.abs().amax(1), rtol=2**-10)  # fp16 scale


def test_group_asymmetric_grid_holds_min_max_and_zero():
    W = torch.rand(4, 32) + 0.5  # all positive: the range [0, max] must still hold 0
    p = IntCodebook(2, symmetric=False, granularity="group", group_size=8, search=False).fit(W)
    assert p.scales.shape == (4, 4)
    top = 3
    torch.testing.assert_close(p.scales, W.view(4, 4, 8).amax(-1) / top, rtol=2**-11, atol=0)
    assert torch.all(p.zeros == 0)
    assert torch.equal(p.decode(torch.zeros(4, 32, dtype=torch.uint8)), torch.zeros(4, 32))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_searched_scale_is_the_best_of_the_grid(symmetric, granularity):
    """Brute force: no candidate scale of the grid (as stored, in fp16) rounds any block with less squared error."""
    g = torch.Generator().manual_seed(30)  # a seed where the unrounded scales' best is not the fp16 scales' best
    W = torch.randn(6, 32, generator=g) * torch.rand(6, 1, generator=g) + torch.randn(6, 32, generator=g).pow(5) * 0.1
    q = IntCodebook(3, symmetric, granularity, group_size=8)
    p = q.fit(W)
    gs = p.group_size

    def block_errors(params):
        err = (round_to_nearest(W, params).W_hat - W).square()
        return err.view(6, -1, gs).sum(-1) if granularity != "tensor" else err.sum().view(1, 1)

    ours = block_errors(p)
    base = IntCodebook(3, symmetric, granularity, group_size=8, search=False).fit(W)
    for a in IntCodebook.SEARCH_GRID.tolist():
        candidate = type(p)((base.scales * a).clamp_min(2**-14).half().float(), base.zeros, 3, gs)
        assert torch.all(ours <= block_errors(candidate) * (1 + 1e-6))  # the same sums in the same order
    assert torch.all(ours <= block_errors(base) + 1e-6)


def test_scales_are_fp16_values():
    p = IntCodebook(4, granularity="group", group_size=16).fit(torch.randn(8, 64) * 3)
    assert torch.equal(p.scales.half().float(), p.scales) and torch.equal(p.zeros.half().float(), p.zeros)


def test_values_on_the_grid_round_trip_exactly():
    q = IntCodebook(3, symmetric=False, granularity="channel", search=False)
    W = torch.randn(6, 24)
    p = q.fit(W)
    codes = torch.randint(0, 8, (6, 24), dtype=torch.uint8)
    grid_values = p.decode(codes)
    assert torch.equal(round_to_nearest(grid_values, p).codes, codes)


def test_round_to_nearest_error_bound():
    W = torch.randn(16, 64)
    for bits in (2, 3, 4, 8):
        p = IntCodebook(bits, granularity="channel", search=False).fit(W)
        W_hat, _ = round_to_nearest(W, p)
        # every weight is inside its row's [-absmax, absmax] (up to the fp16 scale): error <= half a step
        assert torch.all((W_hat - W).abs() <= p.scales / 2 * (1 + 1e-3))


def test_all_zero_rows_get_a_valid_scale():
    W = torch.zeros(4, 8)
    W[1] = 1.0
    for q in (IntCodebook(2, granularity="channel"), IntCodebook(4, symmetric=False, granularity="channel")):
        p = q.fit(W)
        assert torch.all(p.scales > 0)
        assert torch.all(round_to_nearest(W, p).W_hat[0].abs() <= 2**-14)


def test_bad_configurations():
    with pytest.raises(ValueError, match=r"supports bits in \(2, 3, 4, 8\), got 5"):
        IntCodebook(5)
    with pytest.raises(ValueError, match="granularity must be"):
        IntCodebook(4, granularity="row")
    with pytest.raises(ValueError, match="group_size 128 does not divide the 96 input columns"):
        IntCodebook(4, granularity="group", group_size=128).fit(torch.randn(4, 96))
    with pytest.raises(ValueError, match="W must be 2-D"):
        IntCodebook(4).fit(torch.randn(4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_refused(bad):
    """A NaN weight used to become code 0 and an infinite one a scale of 6e6: both silently finite."""
    W = torch.randn(4, 32)
    W[2, 5] = bad
    with pytest.raises(ValueError, match="W has NaN or infinite entries"):
        IntCodebook(4).fit(W)
