"""wtacrs.ops.sampled_linear: exactness, unbiased grad_weight, what it stores, dtypes, shapes, input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import heavy, max_abs_z, saved_tensors_of, z_threshold
from torch import nn

from wtacrs import KeptRows, keep_rows, num_kept_rows, sampled_linear
from wtacrs.ops import SampledLinearFunction, row_probabilities


def _linear(in_f: int, out_f: int, bias: bool = True, dtype=torch.float32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias, dtype=dtype)


def _grads(fn, x: torch.Tensor, layer: nn.Module, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``fn(x)`` and backward ``grad_out``; return its output and the gradients of x and the layer's params."""
    x = x.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = fn(x)
    out.backward(grad_out)
    grads = {"out": out.detach(), "x": x.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    return grads


SHAPES = [(64, 7), (3, 40, 7), (2, 3, 16, 7), (1, 130, 33)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ["wta_crs", "crs", "uniform", "topk"])
def test_forward_bit_identical_and_exact_input_and_bias_grads(shape, bias, method, gen):
    layer = _linear(shape[-1], 5, bias)
    x = torch.randn(shape, generator=gen)
    grad_out = torch.randn(*shape[:-1], 5, generator=gen)
    ref = _grads(layer, x, layer, grad_out)
    got = _grads(lambda t: sampled_linear(t, layer.weight, layer.bias, 0.3, method, generator=gen), x, layer, grad_out)
    assert torch.equal(got["out"], ref["out"])
    assert torch.equal(got["x"], ref["x"])
    if bias:
        assert torch.equal(got["bias"], ref["bias"])
    assert got["weight"].shape == ref["weight"].shape


@pytest.mark.parametrize("shape", SHAPES)
def test_budget_one_is_nn_linear(shape, gen):
    layer = _linear(shape[-1], 5)
    x = torch.randn(shape, generator=gen)
    grad_out = torch.randn(*shape[:-1], 5, generator=gen)
    ref = _grads(layer, x, layer, grad_out)
    got = _grads(lambda t: sampled_linear(t, layer.weight, layer.bias, 1.0), x, layer, grad_out)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def test_fewer_rows_than_min_rows_keeps_all_and_is_exact(gen):
    # N = 6 < min_rows = 10: k is clamped to N (not an error) and the full input is kept.
    layer = _linear(4, 3)
    x = torch.randn(2, 3, 4, generator=gen)
    grad_out = torch.randn(2, 3, 3, generator=gen)
    ref = _grads(layer, x, layer, grad_out)
    got = _grads(lambda t: sampled_linear(t, layer.weight, layer.bias, 0.3, generator=gen), x, layer, grad_out)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-6)


def _grad_weight_draws(layer, x, grad_out, method, draws, seed, transposed=False, row_scores=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(draws):
        layer.weight.grad = None
        y = sampled_linear(x, layer.weight, None, 0.3, method, row_scores, g, transposed=transposed)
        y.backward(grad_out)
        out.append(layer.weight.grad)
    return torch.stack(out)


@pytest.mark.parametrize(
    ("method", "case"),
    [
        ("wta_crs", "plain"),
        ("crs", "plain"),
        ("uniform", "plain"),
        ("wta_crs", "row_scores"),
        ("wta_crs", "conv1d"),
        ("topk", "plain"),
    ],
)
def test_grad_weight_unbiased_and_topk_is_not(method, case):
    """Mean of 2000 sampled grad_weights on heavy-tailed rows is within the SE-derived bound of the exact one,
    also with row scores that are zero for the heaviest rows (the floor keeps them drawable) and for the
    transposed (Conv1D) layout. The same check flags top-k (deterministic: 20 draws suffice)."""
    x = heavy(60, 3, seed=0).reshape(4, 15, 3)
    grad_out = torch.randn(4, 15, 4, generator=torch.Generator().manual_seed(1))
    layer = _linear(3, 4)
    transposed = case == "conv1d"
    if transposed:
        layer.weight = nn.Parameter(layer.weight.detach().T.contiguous())
    row_scores = None
    if case == "row_scores":
        norms = x.norm(dim=-1)
        row_scores = torch.where(norms > norms.quantile(0.8), torch.zeros_like(norms), torch.rand_like(norms))
    exact = grad_out.reshape(-1, 4).double().T @ x.reshape(-1, 3).double()
    if transposed:
        exact = exact.T
    draws = 20 if method == "topk" else 2000
    samples = _grad_weight_draws(layer, x, grad_out, method, draws, 3, transposed, row_scores)
    z, limit = max_abs_z(samples, exact), z_threshold(exact.numel())
    if method == "topk":
        assert z > 100 * limit, f"topk looks unbiased (max |z| {z:.2f})"
    else:
        assert z < limit, f"max |z| {z:.2f} >= {limit:.2f}"


def _saved(layer: nn.Linear, x: torch.Tensor, **kwargs):
    return saved_tensors_of(lambda: sampled_linear(x, layer.weight, layer.bias, **kwargs), *layer.parameters())


@pytest.mark.parametrize("budget", [0.3, 0.1, 0.05])
@pytest.mark.parametrize("method", ["wta_crs", "crs", "uniform", "topk"])
def test_stores_at_most_budget_rows(budget, method, gen):
    layer = _linear(64, 32)
    x = heavy(2 * 500, 64, seed=0).reshape(2, 500, 64).requires_grad_(True)
    saved, y = _saved(layer, x, budget=budget, method=method, generator=gen)
    n, row_bytes = 1000, 64 * 4
    k = num_kept_rows(n, budget)
    assert x not in saved
    # kept rows (at most k, k = ceil(budget * N)) + int32 index + fp32 scale per kept row; nothing else
    assert saved.nbytes <= budget * n * row_bytes + row_bytes + k * (4 + 4)
    assert saved.nbytes <= k * (row_bytes + 8)
    kept_rows, indices, scales = y.grad_fn.saved_tensors[1:]
    assert kept_rows.dtype == torch.float32 and indices.dtype == torch.int32 and scales.dtype == torch.float32
    assert saved.nbytes == kept_rows.numel() * 4 + indices.numel() * 4 + scales.numel() * 4


def test_budget_one_stores_what_nn_linear_stores(gen):
    layer = _linear(64, 32)
    x = torch.randn(300, 64, generator=gen, requires_grad=True)
    ref, _ = saved_tensors_of(lambda: layer(x), *layer.parameters())
    saved, _ = _saved(layer, x, budget=1.0)
    assert saved.nbytes == ref.nbytes == x.numel() * 4
    assert x in saved


def test_frozen_weight_samples_and_stores_nothing(gen):
    layer = _linear(16, 8).requires_grad_(False)
    layer.bias.requires_grad_(True)
    x = torch.randn(200, 16, generator=gen, requires_grad=True)
    state = gen.get_state()
    saved, y = _saved(layer, x, budget=0.3, generator=gen)
    assert saved.nbytes == 0
    assert torch.equal(gen.get_state(), state)  # no rows were drawn
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
    y.sum().backward()
    assert torch.equal(layer.bias.grad, torch.full((8,), 200.0))


def test_no_grad_is_f_linear_and_draws_nothing(gen):
    layer = _linear(16, 8)
    x = torch.randn(200, 16, generator=gen)
    state = gen.get_state()
    with torch.no_grad():
        y = sampled_linear(x, layer.weight, layer.bias, 0.3, generator=gen)
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias)) and y.grad_fn is None
    assert torch.equal(gen.get_state(), state)


def test_same_seed_same_rows_and_gradient():
    layer = _linear(8, 4)
    x = heavy(300, 8, seed=0)
    grad_out = torch.randn(300, 4, generator=torch.Generator().manual_seed(1))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        layer.weight.grad = None
        y = sampled_linear(x, layer.weight, None, 0.3, generator=g)
        indices = y.grad_fn.saved_tensors[2]
        y.backward(grad_out)
        return indices, layer.weight.grad

    (i1, g1), (i2, g2), (i3, _) = run(5), run(5), run(6)
    assert torch.equal(i1, i2) and torch.equal(g1, g2)
    assert not (i1.shape == i3.shape and torch.equal(i1, i3))


def test_shared_kept_rows_are_stored_once(gen):
    """Q, K and V reading one x share one sample: the rows are saved once, each gradient uses them."""
    layers = [_linear(32, 16, seed=s) for s in range(3)]
    x = heavy(400, 32, seed=0).requires_grad_(True)
    params = [p for layer in layers for p in layer.parameters()]

    def forward():
        kept = keep_rows(x, 0.3, generator=gen)
        return kept, [sampled_linear(x, m.weight, m.bias, kept=kept) for m in layers]

    saved, (kept, outs) = saved_tensors_of(forward, *params)
    assert saved.nbytes == sum(t.numel() * t.element_size() for t in kept.saved_tensors)
    sum(o.sum() for o in outs).backward()
    for layer in layers:
        expected = (torch.ones(kept.rows.shape[0], 16) * kept.scales.unsqueeze(1)).T @ kept.rows
        torch.testing.assert_close(layer.weight.grad, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers(dtype, gen):
    layer = _linear(32, 16, dtype=dtype)
    x = heavy(300, 32, seed=0).to(dtype)
    grad_out = torch.randn(300, 16, generator=gen).to(dtype)
    ref = _grads(layer, x, layer, grad_out)
    got = _grads(lambda t: sampled_linear(t, layer.weight, layer.bias, 0.3, generator=gen), x, layer, grad_out)
    assert torch.equal(got["out"], ref["out"]) and torch.equal(got["x"], ref["x"])
    assert torch.equal(got["bias"], ref["bias"])
    assert got["weight"].dtype == dtype and bool(torch.isfinite(got["weight"]).all())
    y = sampled_linear(x.requires_grad_(True), layer.weight, layer.bias, 0.3, generator=gen)
    rows, indices, scales = y.grad_fn.saved_tensors[1:]
    assert rows.dtype == dtype and indices.dtype == torch.int32 and scales.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_stores_rows_in_autocast_dtype_and_no_weight_copy(dtype, gen):
    layer = _linear(32, 16)
    x = heavy(300, 32, seed=0)
    grad_out = torch.randn(300, 16, generator=gen).to(dtype)

    def ref_fn(t):
        with torch.autocast("cpu", dtype=dtype):
            return layer(t)

    def got_fn(t):
        with torch.autocast("cpu", dtype=dtype):
            return sampled_linear(t, layer.weight, layer.bias, 0.3, generator=gen)

    ref = _grads(ref_fn, x, layer, grad_out)
    got = _grads(got_fn, x, layer, grad_out)
    assert got["out"].dtype == dtype and torch.equal(got["out"], ref["out"])
    assert torch.equal(got["x"], ref["x"]) and torch.equal(got["bias"], ref["bias"])
    assert got["weight"].dtype == torch.float32 and bool(torch.isfinite(got["weight"]).all())

    xg = x.clone().requires_grad_(True)
    saved, y = saved_tensors_of(lambda: got_fn(xg), *layer.parameters())
    rows, indices, scales = y.grad_fn.saved_tensors[1:]
    assert rows.dtype == dtype and indices.dtype == torch.int32 and scales.dtype == torch.float32
    assert saved.nbytes == rows.numel() * rows.element_size() + indices.numel() * 4 + scales.numel() * 4


def test_tiny_probabilities_do_not_overflow_fp16(gen):
    """A kept row drawn with p ~ 1e-7 carries a scale ~ 1e6, beyond fp16's range: the gradient stays finite and
    matches the same estimate computed in fp32."""
    n, d_in, d_out = 50, 8, 4
    layer = _linear(d_in, d_out, dtype=torch.float16)
    x = (torch.randn(n, d_in, generator=gen) * 1e-3).half()
    grad_out = torch.randn(n, d_out, generator=gen).half()
    indices = torch.tensor([3, 17, 40], dtype=torch.int32)
    scales = torch.tensor([1e6, 2.5e5, 1.0])
    kept = KeptRows(x.index_select(0, indices), indices, scales, n)
    layer.weight.grad = None
    sampled_linear(x, layer.weight, None, kept=kept).backward(grad_out)
    expected = (grad_out.float()[indices.long()] * scales.unsqueeze(1)).T @ x.float()[indices.long()]
    assert bool(torch.isfinite(layer.weight.grad).all())
    torch.testing.assert_close(layer.weight.grad.float(), expected, rtol=2e-3, atol=1e-3)


def test_conv1d_layout_matches_transformers_conv1d(gen):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 5)
    nn.init.normal_(conv.bias)
    x = torch.randn(3, 20, 5, generator=gen)
    grad_out = torch.randn(3, 20, 6, generator=gen)
    ref = _grads(conv, x, conv, grad_out)
    got = _grads(
        lambda t: sampled_linear(t, conv.weight, conv.bias, 0.3, generator=gen, transposed=True), x, conv, grad_out
    )
    assert torch.equal(got["out"], ref["out"]) and torch.equal(got["x"], ref["x"])
    assert torch.equal(got["bias"], ref["bias"]) and got["weight"].shape == (5, 6)
    exact = _grads(lambda t: sampled_linear(t, conv.weight, conv.bias, 1.0, transposed=True), x, conv, grad_out)
    assert all(torch.equal(exact[name], ref[name]) for name in ref)


def test_row_probabilities_floor_keeps_every_nonzero_row_drawable():
    x = torch.randn(20, 4)
    x[7] = 0.0
    scores = torch.zeros(20)
    scores[0] = 5.0  # a stale cache that says zero for almost every row
    p = row_probabilities(x, scores, floor=0.1)
    assert p[7] == 0 and bool((p[torch.arange(20) != 7] > 0).all())
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    assert torch.equal(row_probabilities(x), x.norm(dim=1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0.0}, r"budget must be in \(0, 1\].*got 0.0"),
        ({"budget": -0.5}, r"budget must be in \(0, 1\].*got -0.5"),
        ({"budget": 1.5}, r"budget must be in \(0, 1\].*got 1.5"),
        ({"budget": math.nan}, r"budget must be in \(0, 1\].*got nan"),
        ({"method": "random"}, "method must be one of 'wta_crs', 'crs', 'uniform', 'topk'; got 'random'"),
        ({"floor": 0.0}, r"floor must be in \(0, 1\]"),
        ({"row_scores": -torch.ones(4, 30)}, "row_scores must be finite and >= 0"),
        ({"row_scores": torch.full((4, 30), math.nan)}, "row_scores must be finite and >= 0"),
        ({"row_scores": torch.ones(30, 4)}, r"row_scores must have shape \(4, 30\).*got \(30, 4\)"),
        ({"row_scores": torch.ones(4, 30, dtype=torch.int64)}, "row_scores must be a floating-point tensor"),
        ({"min_rows": 0}, "min_rows must be an integer >= 1; got 0"),
    ],
)
def test_bad_arguments(kwargs, message, gen):
    layer = _linear(8, 3)
    x = torch.randn(4, 30, 8, generator=gen)
    with pytest.raises(ValueError, match=message):
        sampled_linear(x, layer.weight, layer.bias, **{"budget": 0.3, **kwargs})


def test_one_negative_score_is_caught_even_when_the_mix_would_be_positive(gen):
    layer = _linear(8, 3)
    x = torch.randn(40, 8, generator=gen)
    scores = torch.ones(40)
    scores[5] = -1e-3
    with pytest.raises(ValueError, match="row_scores must be finite and >= 0"):
        sampled_linear(x, layer.weight, layer.bias, 0.3, row_scores=scores)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_is_a_clear_error(bad, gen):
    layer = _linear(8, 3)
    x = torch.randn(40, 8, generator=gen)
    x[11, 2] = bad
    with pytest.raises(ValueError, match=r"x \(the layer input\) contains NaN or Inf"):
        sampled_linear(x, layer.weight, layer.bias, 0.3)


def test_mismatched_inputs(gen):
    layer = _linear(8, 3)
    with pytest.raises(ValueError, match="x has 7 features but the weight of shape"):
        sampled_linear(torch.randn(20, 7), layer.weight, layer.bias)
    kept = keep_rows(torch.randn(30, 8), 0.3, generator=gen)
    with pytest.raises(ValueError, match="kept rows were sampled from an input of 30 rows"):
        sampled_linear(torch.randn(20, 8), layer.weight, layer.bias, kept=kept)


def test_function_skips_unneeded_gradients(gen):
    layer = _linear(8, 3)
    x = torch.randn(40, 8, generator=gen)  # needs no gradient
    kept = keep_rows(x, 0.3, generator=gen)
    y = SampledLinearFunction.apply(x, layer.weight, layer.bias, kept, False)
    y.sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None
