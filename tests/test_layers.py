"""wtacrs.layers: SampledLinear and SampledConv1D as drop-in replacements sharing the original parameters; their
training path (own sampler: activation-norm probabilities, NaN/Inf reported after backward) is unbiased."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    RowTerms, assert_within, check_unbiased, float64_rounding, heavy, product_bound, row_term_branches,
    saved_tensors_of, scale_rounding, winner_count,
)
from torch import nn

import wtacrs
from wtacrs import SampledLinear
from wtacrs.layers import SampledConv1D
from wtacrs.sampling import num_kept_rows


def _pair(bias: bool = True) -> tuple[nn.Linear, SampledLinear]:
    torch.manual_seed(0)
    linear = nn.Linear(12, 5, bias=bias)
    return linear, SampledLinear.from_linear(linear, budget=0.3, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_shares_parameters_and_state_dict_keys(bias):
    linear, sampled = _pair(bias)
    assert sampled.weight is linear.weight and sampled.bias is linear.bias
    assert list(sampled.state_dict()) == list(linear.state_dict())
    with torch.no_grad():
        sampled.weight.add_(1.0)
    assert torch.equal(linear.weight, sampled.weight)
    back = sampled.to_linear()
    assert type(back) is nn.Linear and back.weight is linear.weight and back.bias is linear.bias


def test_state_dicts_are_interchangeable():
    linear, _ = _pair()
    fresh = SampledLinear(12, 5, budget=0.1)
    fresh.load_state_dict(linear.state_dict())
    assert torch.equal(fresh.weight, linear.weight) and torch.equal(fresh.bias, linear.bias)
    nn.Linear(12, 5).load_state_dict(fresh.state_dict())


def test_eval_mode_and_no_grad_are_f_linear():
    linear, sampled = _pair()
    x = heavy(4 * 50, 12, seed=0).reshape(4, 50, 12).requires_grad_(True)
    sampled.eval()
    saved, y = saved_tensors_of(lambda: sampled(x), *sampled.parameters())
    assert torch.equal(y, F.linear(x, linear.weight, linear.bias))
    assert x in saved  # plain F.linear: the exact layer keeps its input
    sampled.train()
    with torch.no_grad():
        y = sampled(x)
    assert torch.equal(y, F.linear(x, linear.weight, linear.bias)) and y.grad_fn is None


def test_training_mode_stores_k_slots_and_the_gradient_is_their_sum():
    """Training keeps k = ceil(0.3 N) slots (rows, int64 indices, float32 scales) and nothing of x; the weight
    gradient is sum_t scale_t outer(grad_y[i_t], x[i_t]) over them, the bias gradient exact."""
    linear, sampled = _pair()
    x = heavy(400, 12, seed=0).requires_grad_(True)
    kept = []
    real_keep = sampled.sampler.keep
    sampled.sampler.keep = lambda layer, x_, scores=None: kept.append(real_keep(layer, x_, scores)) or kept[-1]
    saved, y = saved_tensors_of(lambda: sampled(x), *sampled.parameters())
    del sampled.sampler.keep
    k = num_kept_rows(400, 0.3)
    assert torch.equal(y, linear(x))
    assert x not in saved and saved.nbytes == k * (12 * 4 + 8 + 4)
    rows = kept[0][0]
    grad_out = torch.randn(400, 5, generator=torch.Generator().manual_seed(1))
    y.backward(grad_out)
    terms = grad_out[rows.indices].double() * rows.scales.double()[:, None]
    assert_within(linear.weight.grad, terms.T @ rows.rows.double(), product_bound(terms.T, rows.rows, torch.float32))
    assert_within(linear.bias.grad, grad_out.double().sum(0), product_bound(torch.ones(1, 400), grad_out,
                                                                              torch.float32).reshape(-1))
    assert winner_count(rows.scales) > 0, "heavy-tailed rows should give WTA winners"


@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
def test_training_gradient_is_unbiased(layer_type):
    """The layers' own training path (their sampler, activation-norm probabilities) gives an unbiased weight
    gradient, with the power of conftest.check_unbiased (a 5% scale bias of the winners or the drawn rows)."""
    x = heavy(48, 16, seed=2).double().reshape(4, 12, 16)
    grad_out = torch.randn(4, 12, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.manual_seed(0)
    if layer_type == "linear":
        layer = SampledLinear(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    else:
        layer = SampledConv1D(8, 16, generator=torch.Generator().manual_seed(4)).double()
    x2d, g2d = x.reshape(48, 16), grad_out.reshape(48, 8)
    terms = torch.einsum("io,ij->ioj", g2d, x2d)
    if layer_type == "conv1d":
        terms = terms.transpose(1, 2)
    exact = terms.sum(0)
    norms = x2d.norm(dim=1).float()
    from test_sampling import paper_winner_count

    c = paper_winner_count(norms, num_kept_rows(48, 0.3))
    assert c > 0
    winners = torch.zeros(48, dtype=torch.bool)
    winners[norms.topk(c).indices] = True

    def sample(n: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            layer.weight.grad = None
            layer(x).backward(grad_out)
            out.append(layer.weight.grad.clone())
        return torch.stack(out)

    parts = [RowTerms(slice(0, exact.numel()), terms.reshape(48, -1), winners)]
    branches, directions = row_term_branches(parts, exact.numel())
    check_unbiased(sample, exact, branches, directions=directions,
                   rounding=float64_rounding(exact).reshape(-1) + scale_rounding(parts, exact.numel()),
                   name=f"{layer_type} layer")


def test_training_needs_the_sampled_gradient():
    """A least-squares fit where only the sampled weight learns (no bias): with the sampled gradient it gets close to
    the exact layer's loss; with that gradient zeroed the loss does not move at all."""
    g = torch.Generator().manual_seed(0)
    x = heavy(512, 12, seed=1, tail=3.0)
    x = x / x.norm(dim=1).square().mean().sqrt()
    target = x @ torch.randn(12, 5, generator=g) + 0.01 * torch.randn(512, 5, generator=g)

    def fit(layer: nn.Module, zero_weight_gradient: bool = False) -> tuple[float, float]:
        if zero_weight_gradient:
            layer.weight.register_hook(torch.zeros_like)
        opt = torch.optim.SGD(layer.parameters(), lr=0.5)
        with torch.no_grad():
            start = float(F.mse_loss(layer(x), target))
        for _ in range(300):
            opt.zero_grad()
            F.mse_loss(layer(x), target).backward()
            opt.step()
        with torch.no_grad():
            return start, float(F.mse_loss(layer(x), target))

    def sampled() -> SampledLinear:
        torch.manual_seed(0)
        return SampledLinear(12, 5, bias=False, budget=0.3, generator=torch.Generator().manual_seed(2))

    torch.manual_seed(0)
    start, exact = fit(nn.Linear(12, 5, bias=False))
    _, with_sampling = fit(sampled())
    _, zeroed = fit(sampled(), zero_weight_gradient=True)
    print(f"\nloss: start {start:.4g}, exact {exact:.4g}, sampled {with_sampling:.4g}, gradient zeroed {zeroed:.4g}")
    assert zeroed == start  # the test can fail: without the sampled gradient nothing learns
    # The sampled run closes most of the gap that the exact run closes (SGD noise leaves a little).
    assert start - with_sampling > 0.9 * (start - exact), (start, exact, with_sampling)


@pytest.mark.parametrize("bad", ["input NaN", "input Inf", "negative score"])
def test_non_finite_input_is_reported_after_backward(bad):
    """A NaN or Inf input (or a bad row score) is not read back in forward (no device sync): the weight gradient
    becomes NaN and the backward raises NonFiniteInputError (on CPU, in the same step) naming the problem."""
    _, sampled = _pair()
    x = torch.randn(100, 12)
    scores = None
    if bad == "input NaN":
        x[3, 4] = math.nan
    elif bad == "input Inf":
        x[3, 4] = math.inf
    else:
        scores = torch.ones(100)
        scores[7] = -1.0
    y = sampled(x, row_scores=scores)
    with pytest.raises(wtacrs.NonFiniteInputError, match="held NaN or Inf"):
        y.sum().backward()
    assert bool(sampled.weight.grad.isnan().all())
    # Reported once: the next clean step trains normally.
    sampled.weight.grad = None
    sampled(torch.randn(100, 12)).sum().backward()
    assert bool(sampled.weight.grad.isfinite().all())


def test_row_scores_of_the_wrong_shape_are_refused():
    _, sampled = _pair()
    with pytest.raises(ValueError, match=r"row_scores must have shape \(100,\)"):
        sampled(torch.randn(100, 12), row_scores=torch.ones(99))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0.0}, r"budget must be in \(0, 1\]"),
        ({"budget": 1.2}, r"budget must be in \(0, 1\]"),
        ({"method": "best"}, "method must be one of"),
        ({"floor": 1.5}, r"floor must be in \(0, 1\]"),
        ({"min_rows": 0}, "min_rows must be an integer >= 1; got 0"),
        ({"generator": 3}, "generator must be a torch.Generator or None; got int"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SampledLinear(4, 3, **kwargs)
    with pytest.raises(ValueError, match=message):
        SampledLinear.from_linear(nn.Linear(4, 3), **kwargs)


def test_from_linear_refuses_other_modules():
    with pytest.raises(ValueError, match="from_linear needs an nn.Linear; got Conv1d"):
        SampledLinear.from_linear(nn.Conv1d(3, 3, 1))


def test_repr_shows_settings():
    _, sampled = _pair()
    assert "budget=0.3, method='wta_crs'" in repr(sampled)


def _conv_pair():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 10)
    nn.init.normal_(conv.bias)
    return conv, SampledConv1D.from_conv1d(conv, budget=0.3, generator=torch.Generator().manual_seed(0))


def test_sampled_conv1d_is_a_drop_in_for_transformers_conv1d():
    from transformers.pytorch_utils import Conv1D

    conv, sampled = _conv_pair()
    assert sampled.weight is conv.weight and sampled.bias is conv.bias
    assert (sampled.nf, sampled.nx) == (6, 10)
    assert list(sampled.state_dict()) == list(conv.state_dict())
    back = sampled.to_conv1d()
    assert type(back) is Conv1D and back.weight is conv.weight and (back.nf, back.nx) == (6, 10)

    x = heavy(3 * 60, 10, seed=0).reshape(3, 60, 10).requires_grad_(True)
    grad_out = torch.randn(3, 60, 6)
    y_ref = conv(x)
    (gx_ref,) = torch.autograd.grad(y_ref, x, grad_out)
    saved, y = saved_tensors_of(lambda: sampled(x), *sampled.parameters())
    assert torch.equal(y, y_ref) and x not in saved  # Conv1D's own addmm on the same inputs
    y.backward(grad_out)
    # grad_x: the same product by another call: within the rounding bound of its 6-term sums.
    assert_within(x.grad, gx_ref, product_bound(grad_out, conv.weight.T, torch.float32))
    assert conv.weight.grad.shape == (10, 6)
    sampled.eval()
    assert torch.equal(sampled(x), y_ref)


def test_sampled_conv1d_own_parameters_and_refusals():
    fresh = SampledConv1D(6, 10, budget=0.5)
    assert fresh.weight.shape == (10, 6) and fresh.bias.shape == (6,)
    assert "nf=6, nx=10, budget=0.5" in repr(fresh)
    with pytest.raises(ValueError, match="from_conv1d needs a transformers Conv1D; got Linear"):
        SampledConv1D.from_conv1d(nn.Linear(3, 3))
