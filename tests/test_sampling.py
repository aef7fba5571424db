"""wtacrs.sampling: row budget, winner rule, unbiasedness, variance ordering, input checks, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import heavy, max_abs_z, z_threshold

from wtacrs import METHODS, approx_matmul, num_kept_rows, sample_rows

UNBIASED = ("wta_crs", "crs", "uniform")


@pytest.mark.parametrize(
    ("n", "budget", "min_rows", "k"),
    [
        (100, 0.3, 10, 30),
        (10, 0.3, 10, 10),  # min_rows wins
        (7, 0.3, 10, 7),  # clamped to N
        (1000, 0.1, 10, 100),
        (1001, 0.1, 10, 101),  # ceil
        (50, 1.0, 10, 50),
        (50, 0.01, 1, 1),
        (0, 0.3, 10, 0),
    ],
)
def test_num_kept_rows(n, budget, min_rows, k):
    assert num_kept_rows(n, budget, min_rows) == k


@pytest.mark.parametrize("budget", [0, 0.0, -0.1, 1.0001, 2, math.nan, math.inf, "0.3", True, None])
def test_bad_budget(budget):
    with pytest.raises(ValueError, match=r"budget must be .*\(0, 1\]"):
        num_kept_rows(100, budget)


def test_bad_method():
    with pytest.raises(ValueError, match="method must be one of 'wta_crs', 'crs', 'uniform', 'topk'; got 'wta'"):
        sample_rows(torch.ones(20), 5, "wta")


@pytest.mark.parametrize(
    ("probs", "message"),
    [
        (torch.tensor([0.5, -0.1] + [1.0] * 18), "probs must be finite and >= 0; got 1 negative of 20 entries"),
        (torch.tensor([math.nan] + [1.0] * 19), "probs must be finite and >= 0; got 1 NaN of 20 entries"),
        (torch.tensor([math.inf] * 2 + [1.0] * 18), "probs must be finite and >= 0; got 2 Inf of 20 entries"),
        (torch.ones(20, 1), r"probs must be a 1-D tensor with one weight per row; got \(20, 1\)"),
        ([1.0] * 20, "probs must be a 1-D tensor with one weight per row; got list"),
        (torch.ones(20, dtype=torch.int64), "probs must be a floating-point tensor; got torch.int64"),
    ],
)
def test_bad_probs(probs, message):
    with pytest.raises(ValueError, match=message):
        sample_rows(probs, 5)


def test_bad_probs_also_when_every_row_is_kept():
    with pytest.raises(ValueError, match="1 NaN"):
        sample_rows(torch.tensor([1.0, math.nan]), 5)


def test_probs_of_wrong_length_for_approx_matmul():
    a, b = torch.randn(20, 3), torch.randn(20, 2)
    with pytest.raises(ValueError, match=r"probs must have shape \(20,\), one entry per row; got \(19,\)"):
        approx_matmul(a, b, 5, probs=torch.ones(19))


def test_non_finite_operands_name_the_problem():
    a, b = torch.randn(20, 3), torch.randn(20, 2)
    a[3, 1] = math.inf
    with pytest.raises(ValueError, match="a and b must be finite"):
        approx_matmul(a, b, 5)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k \\(rows to keep\\) must be an integer >= 1"):
        sample_rows(torch.ones(20), k)


@pytest.mark.parametrize("method", METHODS)
def test_k_beyond_n_is_exact(method):
    a, b = torch.randn(12, 3), torch.randn(12, 2)
    indices, scales = sample_rows(torch.rand(12), 50, method)
    assert torch.equal(indices, torch.arange(12))
    assert torch.equal(scales, torch.ones(12))
    assert torch.equal(approx_matmul(a, b, 50, method), a.T @ b)


@pytest.mark.parametrize("method", METHODS)
def test_kept_rows_are_distinct_sorted_and_within_budget(method, gen):
    probs = heavy(200, 1, seed=3).abs().squeeze(1)
    for _ in range(20):
        indices, scales = sample_rows(probs, 30, method, gen)
        assert indices.dtype == torch.int64 and scales.dtype == torch.float32
        assert 1 <= indices.numel() <= 30
        assert torch.equal(indices, torch.unique(indices))
        assert bool((scales > 0).all())


def test_zero_probability_rows_are_never_kept(gen):
    probs = torch.rand(100, generator=gen)
    probs[::2] = 0.0
    for method in ("wta_crs", "crs", "topk"):
        indices, _ = sample_rows(probs, 20, method, gen)
        assert bool((indices % 2 == 1).all()), method


def _winner_count(probs: torch.Tensor, k: int) -> int:
    """The paper's rule, written plainly: argmin over c = 0..k-1 of (1 - P_c) / (k - c)."""
    p = sorted((probs / probs.sum()).tolist(), reverse=True)
    costs = [(1.0 - sum(p[:c])) / (k - c) for c in range(k)]
    return costs.index(min(costs))


def test_winners_follow_the_argmin_rule_and_are_kept_with_scale_one(gen):
    probs = torch.tensor([40.0, 25.0, 10.0, 6.0, 5.0] + [1.0] * 45)
    k = 10
    c = _winner_count(probs, k)
    assert c == 3  # the three largest rows are worth keeping exactly, the fourth is not
    winners = torch.arange(c)
    rest = probs[c:].sum() / probs.sum()
    for _ in range(50):
        indices, scales = sample_rows(probs, k, "wta_crs", gen)
        assert torch.equal(indices[:c], winners)
        assert torch.equal(scales[:c], torch.ones(c))
        # Every other kept row carries m draws of scale (1 - P_C) / ((k - c) p_j), m >= 1.
        p = probs[indices[c:]] / probs.sum()
        draws = scales[c:] * (k - c) * p / rest
        assert torch.allclose(draws, draws.round(), atol=1e-4) and bool((draws.round() >= 1).all())
        assert int(draws.round().sum()) == k - c


def test_winners_holding_all_mass_give_the_exact_product(gen):
    a, b = torch.randn(40, 3), torch.randn(40, 2)
    a[5:] = 0.0  # only 5 non-zero rows, k = 10: WTA keeps them all as winners, nothing is drawn
    for _ in range(5):
        assert torch.allclose(approx_matmul(a, b, 10, "wta_crs", generator=gen), a.T @ b, atol=1e-6)


def test_all_zero_probabilities_give_zero(gen):
    a, b = torch.zeros(30, 3), torch.randn(30, 2)
    for method in METHODS:
        assert torch.equal(approx_matmul(a, b, 10, method, generator=gen), torch.zeros(3, 2))


def test_duplicates_are_merged_into_summed_scales():
    # One row holds almost all the mass: CRS draws it nearly every time, and stores it once.
    probs = torch.tensor([1e6] + [1.0] * 99)
    indices, scales = sample_rows(probs, 20, "crs", torch.Generator().manual_seed(0))
    assert indices[0] == 0 and indices.numel() < 20
    p0 = float(probs[0] / probs.sum())
    draws_of_row0 = float(scales[0]) * 20 * p0
    assert abs(draws_of_row0 - round(draws_of_row0)) < 1e-3 and round(draws_of_row0) >= 15


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_rows(method):
    probs = heavy(300, 1, seed=5).abs().squeeze(1)
    first = sample_rows(probs, 40, method, torch.Generator().manual_seed(7))
    again = sample_rows(probs, 40, method, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    if method != "topk":
        other = sample_rows(probs, 40, method, torch.Generator().manual_seed(8))
        same = first[0].shape == other[0].shape and all(torch.equal(x, y) for x, y in zip(first, other))
        assert not same


def _draws(method: str, a: torch.Tensor, b: torch.Tensor, k: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([approx_matmul(a, b, k, method, generator=g) for _ in range(n)])


@pytest.mark.parametrize("budget", [0.3, 0.1])
def test_unbiased_and_topk_is_not(budget):
    """Mean of 2000 estimates of a.T @ b on heavy-tailed rows is within the SE-derived bound of the exact value
    for every unbiased method; the same check flags top-k."""
    a, b = heavy(100, 4, seed=0), heavy(100, 3, seed=1)
    exact = a.double().T @ b.double()
    k = num_kept_rows(100, budget)
    limit = z_threshold(exact.numel())
    for method in UNBIASED:
        z = max_abs_z(_draws(method, a, b, k, 2000, seed=11), exact)
        assert z < limit, f"{method} at budget {budget}: max |z| {z:.2f} >= {limit:.2f}"
    z_topk = max_abs_z(_draws("topk", a, b, k, 50, seed=11), exact)
    assert z_topk > 100 * limit, f"topk looks unbiased (max |z| {z_topk:.2f})"


def relative_mse(method: str, a, b, budget: float, draws: int, seed: int) -> tuple[float, float]:
    """Mean of ||estimate - a.T b||^2 / ||a.T b||^2 over independent draws, and its standard error."""
    exact = a.T @ b
    k = num_kept_rows(a.shape[0], budget)
    g = torch.Generator().manual_seed(seed)
    errs = torch.stack(
        [(approx_matmul(a, b, k, method, generator=g) - exact).square().sum() for _ in range(draws)]
    ).double() / exact.square().sum().double()
    return float(errs.mean()), float(errs.std() / math.sqrt(draws))


@pytest.mark.parametrize("budget", [0.3, 0.1])
def test_variance_wta_crs_below_crs_below_uniform(budget):
    a, b = heavy(256, 16, seed=0), heavy(256, 16, seed=1)
    (wta, se_w), (crs, se_c), (uni, se_u) = (relative_mse(m, a, b, budget, 300, seed=2) for m in UNBIASED)
    # Each gap must exceed 4 standard errors of the difference: the order is not noise of the 300 draws.
    assert crs - wta > 4 * math.hypot(se_w, se_c), (wta, se_w, crs, se_c)
    assert uni - crs > 4 * math.hypot(se_c, se_u), (crs, se_c, uni, se_u)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scales_do_not_overflow(dtype):
    # 1e5 equally likely rows, k = 1: the one scale is 1e5, beyond fp16's range (65504).
    n = 100_000
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(n, 2, generator=g) * 1e-2).to(dtype)
    b = (torch.rand(n, 1, generator=g) * 1e-2).to(dtype)
    probs = torch.ones(n)
    _, scales = sample_rows(probs, 1, "crs", torch.Generator().manual_seed(1))
    assert float(scales.min()) > torch.finfo(torch.float16).max
    est = approx_matmul(a, b, 1, "crs", probs, torch.Generator().manual_seed(1))
    ref = approx_matmul(a.float(), b.float(), 1, "crs", probs, torch.Generator().manual_seed(1))
    assert est.dtype == dtype and bool(torch.isfinite(est).all())
    torch.testing.assert_close(est.float(), ref, rtol=1e-2, atol=0)
