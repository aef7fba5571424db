"""wtacrs.gradstats: per-token running output-gradient norms (the default probabilities), from the probe's gradient
to the scores forward reads."""

from __future__ import annotations

import math

import pytest
import torch
from sampled_gradients import Recorder, sampled_layers
from tiny_models import tiny_batch, tiny_model

import wtacrs
from wtacrs.gradstats import TokenGradStats
from wtacrs.patch import _STATE_ATTR

pytestmark = pytest.mark.usefixtures("one_thread")


def test_contribution_sums_normalised_norms_per_token():
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(10, 6, generator=g, dtype=torch.float64)
    ids = torch.tensor([3, 1, 3, 0, 7, 1, 1, 3, 2, 7])
    out = TokenGradStats.contribution(grad, ids, 8)
    norms = grad.norm(dim=1)
    expected = torch.zeros(8, 2, dtype=torch.float64)
    for i, v in enumerate(ids.tolist()):
        expected[v, 0] += norms[i] / norms.mean()
        expected[v, 1] += 1
    assert out.dtype == torch.float32 and out.shape == (8, 2)
    torch.testing.assert_close(out.double(), expected, rtol=4 * 2**-24 * 10, atol=0)


def test_fold_keeps_a_moving_average_and_scores_have_a_floor():
    stats = TokenGradStats(vocab_size=5, floor=0.1, decay=0.9)
    assert bool(stats.table.isnan().all()) and torch.equal(stats.scores, torch.ones(5))  # empty: all rows alike
    # Step 1: token 0 mean 2.0, token 1 mean 0.0 (its rows carried no gradient), token 2 mean 1.0; 3 and 4 unseen.
    stats.fold(torch.tensor([[4.0, 2.0], [0.0, 3.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(stats.table[:3], torch.tensor([2.0, 0.0, 1.0]))
    assert bool(stats.table[3:].isnan().all())
    mean = 1.0  # of the seen tokens
    torch.testing.assert_close(stats.scores, torch.tensor([2.0, 0.1 * mean, 1.0, mean, mean]))
    # Step 2: token 0 seen again (mean 4.0) -> 0.9 * 2 + 0.1 * 4; a non-finite mean (an fp16 overflow) is skipped.
    stats.fold(torch.tensor([[4.0, 1.0], [math.inf, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(stats.table[:3], torch.tensor([2.2, 0.0, 1.0]))
    mean = (2.2 + 0.0 + 1.0) / 3
    torch.testing.assert_close(stats.scores, torch.tensor([2.2, 0.1 * mean, 1.0, mean, mean]))


def test_bad_settings():
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 1; got 0"):
        TokenGradStats(0, floor=0.1)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\); got 1.0"):
        TokenGradStats(10, floor=0.1, decay=1.0)


def test_a_backward_folds_each_layers_norms_into_its_rows_tokens():
    """After one training step of a patched causal LM, the table holds, per token id, the mean over every sampled
    layer's rows of that token of ||dy_i|| / mean_j ||dy_j|| (dy from the same step, recorded by hooks); padded
    positions, whose output gradients are zero under a loss that ignores them, give the pad token 0, and its score
    is the floor."""
    model = tiny_model("llama").double()
    wtacrs.apply_wtacrs(model, budget=0.3, targets="full")
    batch = tiny_batch("llama", padded=True)
    stats = getattr(model, _STATE_ATTR).sampler.stats
    with Recorder(model) as rec:
        model(**batch).loss.backward()
    ids = batch["input_ids"].reshape(-1)
    sums = torch.zeros(stats.vocab_size, dtype=torch.float64)
    counts = torch.zeros(stats.vocab_size, dtype=torch.float64)
    for name in sampled_layers(model):
        dy = rec.dy[name][0].reshape(len(ids), -1)
        norms = dy.norm(dim=1)
        sums.index_add_(0, ids, norms / norms.mean())
        counts.index_add_(0, ids, torch.ones_like(norms))
    seen = counts > 0
    torch.testing.assert_close(stats.table[seen].double(), sums[seen] / counts[seen], rtol=1e-5, atol=1e-7)
    assert bool(stats.table[~seen].isnan().all())
    pad = batch["input_ids"][~batch["attention_mask"].bool()].unique()
    only_padding = pad[~torch.isin(pad, batch["input_ids"][batch["attention_mask"].bool()])]
    assert len(only_padding) and bool((stats.table[only_padding] == 0).all())
    mean = stats.table[seen].mean()
    torch.testing.assert_close(stats.scores[only_padding], (0.1 * mean).expand(len(only_padding)))
