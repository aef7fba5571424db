"""wtacrs.sampling: row budget, winner rule, slot formulas, unbiasedness with designed power, variance ordering,
non-finite weights, input checks, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import check_unbiased, heavy, sum_rounding, winner_count

from wtacrs import METHODS, approx_matmul, num_kept_rows, sample_rows
from wtacrs.sampling import draw

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
        (torch.ones(2, 3, 20), r"probs must be a floating-point tensor of shape \(N,\) or \(G, N\); got "
                               r"torch.float32 tensor of shape \(2, 3, 20\)"),
        ([1.0] * 20, r"probs must be a floating-point tensor of shape \(N,\) or \(G, N\); got list"),
        (torch.ones(20, dtype=torch.int64), r"shape \(N,\) or \(G, N\); got torch.int64 tensor of shape \(20,\)"),
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
    with pytest.raises(ValueError, match=r"probs must have shape \(20,\), one weight per row; got \(19,\)"):
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
@pytest.mark.parametrize("groups", [None, 5])
def test_always_k_slots_of_valid_rows(method, groups, gen):
    """Static shapes: k slots whatever the values (rows may repeat), int64 indices in range, positive float32
    scales; a (G, N) weight matrix gives k slots per row."""
    probs = heavy(200, 1, seed=3).abs().squeeze(1)
    if groups:
        probs = probs.expand(groups, -1).contiguous()
    for _ in range(10):
        indices, scales = sample_rows(probs, 30, method, gen)
        assert indices.shape == scales.shape == probs.shape[:-1] + (30,)
        assert indices.dtype == torch.int64 and scales.dtype == torch.float32
        assert bool(((indices >= 0) & (indices < 200)).all()) and bool((scales > 0).all())


def test_zero_probability_rows_are_never_kept(gen):
    probs = torch.rand(100, generator=gen)
    probs[::2] = 0.0
    for method in ("wta_crs", "crs", "topk"):
        indices, _ = sample_rows(probs, 20, method, gen)
        assert bool((indices % 2 == 1).all()), method


def paper_winner_count(probs: torch.Tensor, k: int) -> int:
    """The paper's rule, written plainly: argmin over c = 0..k-1 of (1 - P_c) / (k - c)."""
    p = sorted((probs.double() / probs.double().sum()).tolist(), reverse=True)
    costs = [(1.0 - sum(p[:c])) / (k - c) for c in range(k)]
    return costs.index(min(costs))


def test_every_slot_follows_the_formulas(gen):
    """WTA-CRS: the first c slots hold the c most probable rows with scale exactly 1 (c by the argmin rule); every
    other slot is one draw with scale (1 - P_C) / ((k - c) p_j), duplicates included, each in its own slot. CRS:
    scale 1 / (k p_j); uniform: N / k. The same for each row of a (G, N) weight matrix."""
    probs = torch.tensor([40.0, 25.0, 10.0, 6.0, 5.0] + [1.0] * 45)
    k, n = 10, probs.numel()
    c = paper_winner_count(probs, k)
    assert c == 3  # the three largest rows are worth keeping exactly, the fourth is not
    p = probs.double() / probs.double().sum()
    rest = 1.0 - float(p[:c].sum())
    batched = sample_rows(probs.expand(4, -1).contiguous(), k, "wta_crs", gen)
    for indices, scales in [sample_rows(probs, k, "wta_crs", gen) for _ in range(30)] + list(zip(*batched)):
        assert torch.equal(indices[:c], torch.arange(c)) and torch.equal(scales[:c], torch.ones(c))
        assert winner_count(scales) == c
        assert bool((indices[c:] >= c).all())
        torch.testing.assert_close(scales[c:].double(), rest / ((k - c) * p[indices[c:]]), rtol=1e-6, atol=0)
    for _ in range(10):
        indices, scales = sample_rows(probs, k, "crs", gen)
        torch.testing.assert_close(scales.double(), 1.0 / (k * p[indices]), rtol=1e-6, atol=0)
        _, scales = sample_rows(probs, k, "uniform", gen)
        assert torch.equal(scales, torch.full((k,), n / k))


def test_duplicate_draws_stay_separate_slots():
    """One row holds almost all the mass: CRS draws it in most of its k slots, each with the same scale."""
    probs = torch.tensor([1e6] + [1.0] * 99)
    indices, scales = sample_rows(probs, 20, "crs", torch.Generator().manual_seed(0))
    repeats = indices == 0
    assert indices.numel() == 20 and int(repeats.sum()) >= 15
    p0 = float(probs[0] / probs.sum())
    torch.testing.assert_close(scales[repeats].double(), torch.full((int(repeats.sum()),), 1 / (20 * p0),
                                                                     dtype=torch.float64))


def test_winners_holding_all_mass_give_the_exact_product(gen):
    a, b = torch.randn(40, 3), torch.randn(40, 2)
    a[5:] = 0.0  # only 5 non-zero rows, k = 10: WTA keeps them all as winners, the draws add zero terms
    for _ in range(5):
        assert torch.allclose(approx_matmul(a, b, 10, "wta_crs", generator=gen), a.T @ b, atol=1e-6)


def test_all_zero_probabilities_give_zero(gen):
    a, b = torch.zeros(30, 3), torch.randn(30, 2)
    for method in METHODS:
        assert torch.equal(approx_matmul(a, b, 10, method, generator=gen), torch.zeros(3, 2))


@pytest.mark.parametrize("method", UNBIASED)
def test_non_finite_weights_make_their_row_nan_and_the_counter_non_finite(method, gen):
    """draw() (the unchecked, sync-free core): a NaN or Inf weight makes every scale of its row NaN and the
    counter non-finite; the other rows of a (G, N) matrix are untouched."""
    probs = torch.rand(3, 50, generator=gen) + 0.1
    probs[1, 7] = math.nan
    probs[2, 3] = math.inf
    counter = torch.zeros(())
    indices, scales = draw(probs, 10, method, gen, counter)
    assert bool(scales[1:].isnan().all()) and bool(scales[0].isfinite().all())
    assert bool(((indices >= 0) & (indices < 50)).all())
    assert not math.isfinite(float(counter))


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_rows(method):
    probs = heavy(300, 1, seed=5).abs().squeeze(1)
    first = sample_rows(probs, 40, method, torch.Generator().manual_seed(7))
    again = sample_rows(probs, 40, method, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    if method != "topk":
        other = sample_rows(probs, 40, method, torch.Generator().manual_seed(8))
        assert not all(torch.equal(x, y) for x, y in zip(first, other))


def _operands() -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy-tailed rows (float64, so the only error left is the estimator's): a few rows dominate."""
    return heavy(100, 4, seed=0).double(), heavy(100, 3, seed=1).double()


def _branches(a, b, k: int, method: str) -> dict[str, torch.Tensor]:
    """Expected contribution of each branch of the estimator: the winners (kept exactly) and the drawn rest."""
    exact = a.T @ b
    if method != "wta_crs":
        return {"drawn": exact}
    probs = a.norm(dim=1) * b.norm(dim=1)
    c = paper_winner_count(probs, k)
    assert c > 0, "heavy-tailed rows should give WTA winners"
    top = probs.topk(c).indices
    winners = a[top].T @ b[top]
    return {"winners": winners, "drawn": exact - winners}


UNBIASED_CASES = [("batched", m, b) for m in UNBIASED for b in (0.3, 0.1)] + [
    ("approx_matmul", "wta_crs", 0.3), ("approx_matmul", "crs", 0.3)]


@pytest.mark.parametrize(("path", "method", "budget"), UNBIASED_CASES)
def test_unbiased_with_designed_power(path, method, budget):
    """The mean of the estimates of a.T @ b equals the exact product: per entry and per branch (winners, drawn
    rows), with enough draws to catch a 5% scale bias in either branch (see conftest.check_unbiased; uniform
    sampling of heavy-tailed rows needs tens of thousands). ``batched`` draws one sample per row of a (G, N) weight
    matrix at once (the attention path, and vectorised); ``approx_matmul`` one call per draw (the 1-D path)."""
    a, b = _operands()
    n, k = a.shape[0], num_kept_rows(a.shape[0], budget)
    probs = a.norm(dim=1) * b.norm(dim=1)
    g = torch.Generator().manual_seed(11)

    def sample(draws: int) -> torch.Tensor:
        if path == "approx_matmul":
            return torch.stack([approx_matmul(a, b, k, method, generator=g) for _ in range(draws)])
        indices, scales = sample_rows(probs.float().expand(draws, -1).contiguous(), k, method, g)
        return torch.einsum("gt,gti,gtj->gij", scales.double(), a[indices], b[indices])

    rounding = sum_rounding(a.abs().T @ b.abs(), n, torch.float64)
    check_unbiased(sample, a.T @ b, _branches(a, b, k, method), name=f"{method}@{budget} {path}", rounding=rounding,
                   max_draws=200_000 if path == "batched" else 10_000, chunk=10_000 if path == "batched" else 100)


def test_topk_is_flagged_by_the_same_check():
    a, b = _operands()
    g = torch.Generator().manual_seed(11)
    with pytest.raises(AssertionError, match="biased"):
        check_unbiased(lambda n: torch.stack([approx_matmul(a, b, 30, "topk", generator=g) for _ in range(n)]),
                       a.T @ b, {"drawn": a.T @ b}, name="topk", min_draws=20, pilot=10)


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
