"""Shared helpers: heavy-tailed data, saved-tensor accounting and the statistical check for unbiasedness."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from torch import Tensor

from wtacrs.app.demo import heavy_tailed_rows
from wtacrs.memory import SavedTensors

#: Chance that an unbiased estimator fails ``assert_unbiased`` (family-wise over all entries of one check).
FAMILY_ALPHA = 1e-4


def heavy(n: int, d: int, seed: int, tail: float = 1.5) -> Tensor:
    """(n, d) rows with Pareto(``tail``) norms: a few rows dominate, as in real activations and gradients."""
    return heavy_tailed_rows(n, d, tail, torch.Generator().manual_seed(seed))


def z_threshold(entries: int, alpha: float = FAMILY_ALPHA) -> float:
    """Largest |z| an unbiased estimate may show over ``entries`` entries: the two-sided Bonferroni bound for a
    family-wise false-alarm rate ``alpha``, and never below 4 standard errors."""
    return max(4.0, NormalDist().inv_cdf(1.0 - alpha / (2 * entries)))


def max_abs_z(draws: Tensor, exact: Tensor) -> float:
    """max over entries of |mean(draws) - exact| / SE, SE = sample std / sqrt(#draws) from the same draws.

    Entries the estimator gets exactly (SE ~ 0, e.g. rows kept as winners every time) may still differ from
    ``exact`` by float rounding; that slack (1e-5 of the largest entry) is allowed before dividing.
    """
    draws = draws.double()
    exact = exact.double()
    mean = draws.mean(0)
    se = draws.std(0) / math.sqrt(draws.shape[0])
    slack = 1e-5 * exact.abs().max()
    excess = ((mean - exact).abs() - slack).clamp_min(0.0)
    return float((excess / se.clamp_min(1e-300)).max())


def saved_tensors_of(fn, *exclude: Tensor) -> tuple[SavedTensors, object]:
    """Run ``fn()`` recording what autograd saves (parameters and ``exclude`` left out); return both."""
    with SavedTensors(exclude=exclude) as saved:
        out = fn()
    return saved, out


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors: threads only add waiting there (a lot, on a busy
    machine). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
