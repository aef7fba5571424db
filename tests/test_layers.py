"""wtacrs.layers: SampledLinear and SampledConv1D as drop-in replacements sharing the original parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import heavy, saved_tensors_of
from torch import nn

from wtacrs import SampledLinear
from wtacrs.layers import SampledConv1D


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


def test_training_mode_samples_and_trains_the_shared_weight():
    linear, sampled = _pair()
    x = heavy(400, 12, seed=0).requires_grad_(True)
    saved, y = saved_tensors_of(lambda: sampled(x), *sampled.parameters())
    assert torch.equal(y, linear(x))
    assert x not in saved and saved.nbytes <= 0.3 * x.numel() * 4 + 120 * 8 + 12 * 4
    y.square().mean().backward()
    assert linear.weight.grad is not None and linear.weight.grad.shape == (5, 12)


def test_training_converges_like_nn_linear():
    """A least-squares fit with SampledLinear (budget 0.3) reaches nearly the loss of the exact layer."""
    g = torch.Generator().manual_seed(0)
    x = heavy(512, 12, seed=1)
    target = x @ torch.randn(12, 5, generator=g) + 0.01 * torch.randn(512, 5, generator=g)

    def fit(layer: nn.Module) -> float:
        opt = torch.optim.SGD(layer.parameters(), lr=0.02)
        scale = x.norm(dim=1).max()
        for _ in range(300):
            opt.zero_grad()
            F.mse_loss(layer(x / scale), target / scale).backward()
            opt.step()
        with torch.no_grad():
            return float(F.mse_loss(layer(x / scale), target / scale))

    torch.manual_seed(0)
    exact = fit(nn.Linear(12, 5))
    torch.manual_seed(0)
    sampled = fit(SampledLinear(12, 5, budget=0.3, generator=torch.Generator().manual_seed(2)))
    assert sampled < 1.5 * exact + 1e-6, (sampled, exact)


def test_row_scores_are_passed_through():
    _, sampled = _pair()
    x = torch.randn(100, 12)
    with pytest.raises(ValueError, match="row_scores must be finite and >= 0"):
        sampled(x, row_scores=-torch.ones(100))


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
    assert torch.equal(y, y_ref) and x not in saved
    y.backward(grad_out)
    assert torch.equal(x.grad, gx_ref) and conv.weight.grad.shape == (10, 6)
    sampled.eval()
    assert torch.equal(sampled(x), y_ref)


def test_sampled_conv1d_own_parameters_and_refusals():
    fresh = SampledConv1D(6, 10, budget=0.5)
    assert fresh.weight.shape == (10, 6) and fresh.bias.shape == (6,)
    assert "nf=6, nx=10, budget=0.5" in repr(fresh)
    with pytest.raises(ValueError, match="from_conv1d needs a transformers Conv1D; got Linear"):
        SampledConv1D.from_conv1d(nn.Linear(3, 3))
