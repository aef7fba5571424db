"""wtacrs.ops.sampled_linear: exact forward, exact input and bias gradients, unbiased grad_weight (with designed
power), what it stores, dtypes, shapes, skipped gradients, non-finite inputs, argument checks.

Where the sampled op and the stock layer compute the same quantity by different code paths (grad_x, grad_bias),
they are compared within the floating-point error bound of the sum (``conftest.sum_rounding``), never bit for bit;
bit identity is asserted only where both run the same kernel on the same inputs (the forward is ``F.linear``,
budget 1.0 is ``F.linear`` itself).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    RowTerms, assert_within, check_unbiased, float64_rounding, heavy, product_bound, row_term_branches,
    saved_tensors_of, scale_rounding, sum_rounding,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from wtacrs import KeptRows, keep_rows, num_kept_rows, sampled_linear
from wtacrs.ops import SampledLinearFunction, apply_sampled_linear, row_probabilities


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


def exact_parts_bounds(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rounding bounds of grad_x = grad_y W (sums over out_features) and grad_bias (sums over rows) in x's dtype."""
    g2d = grad_out.reshape(-1, grad_out.shape[-1])
    return {"x": product_bound(g2d, weight, x.dtype).reshape(x.shape),
            "bias": product_bound(torch.ones(1, g2d.shape[0]), g2d, x.dtype).reshape(-1)}


SHAPES = [(64, 7), (3, 40, 7), (2, 3, 16, 7), (1, 130, 33)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ["wta_crs", "crs", "uniform", "topk"])
def test_forward_exact_and_exact_input_and_bias_grads(shape, bias, method, gen):
    layer = _linear(shape[-1], 5, bias)
    x = torch.randn(shape, generator=gen)
    grad_out = torch.randn(*shape[:-1], 5, generator=gen)
    ref = _grads(layer, x, layer, grad_out)
    got = _grads(lambda t: sampled_linear(t, layer.weight, layer.bias, 0.3, method, generator=gen), x, layer, grad_out)
    assert torch.equal(got["out"], ref["out"])  # the same F.linear on the same inputs
    bounds = exact_parts_bounds(x, layer.weight, grad_out)
    assert_within(got["x"], ref["x"], bounds["x"])
    if bias:
        assert_within(got["bias"], ref["bias"], bounds["bias"])
    assert got["weight"].shape == ref["weight"].shape


@pytest.mark.parametrize("shape", SHAPES)
def test_budget_one_is_nn_linear(shape, gen):
    """Budget 1.0 runs F.linear itself (the stock autograd graph): bit-identical."""
    layer = _linear(shape[-1], 5)
    x = torch.randn(shape, generator=gen)
    grad_out = torch.randn(*shape[:-1], 5, generator=gen)
    ref = _grads(layer, x, layer, grad_out)
    got = _grads(lambda t: sampled_linear(t, layer.weight, layer.bias, 1.0), x, layer, grad_out)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name


def test_fewer_rows_than_min_rows_keeps_all_and_is_exact(gen):
    # N = 6 < min_rows = 10: k is clamped to N (not an error), the whole input is kept and every gradient is exact.
    layer = _linear(4, 3)
    x = torch.randn(2, 3, 4, generator=gen)
    grad_out = torch.randn(2, 3, 3, generator=gen)
    ref = _grads(layer, x, layer, grad_out)
    got = _grads(lambda t: sampled_linear(t, layer.weight, layer.bias, 0.3, generator=gen), x, layer, grad_out)
    bounds = exact_parts_bounds(x, layer.weight, grad_out)
    g2d, x2d = grad_out.reshape(-1, 3), x.reshape(-1, 4)
    bounds["weight"] = sum_rounding(g2d.abs().T.double() @ x2d.abs().double(), x2d.shape[0], torch.float32)
    for name in ("x", "bias", "weight"):
        assert_within(got[name], ref[name], bounds[name])


def _unbiased_case(case: str):
    """x (48 rows of 8 features, heavy-tailed: WTA keeps winners), grad_out, and row scores for the case."""
    x = heavy(48, 8, seed=0).double().reshape(4, 12, 8)
    grad_out = torch.randn(4, 12, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    row_scores = None
    if case == "row_scores":  # scores that say zero for the heaviest rows: only the floor keeps them drawable
        norms = x.norm(dim=-1)
        row_scores = torch.where(norms > norms.quantile(0.8), torch.zeros_like(norms),
                                 torch.rand(norms.shape, generator=torch.Generator().manual_seed(2),
                                            dtype=torch.float64))
    return x, grad_out, row_scores


def _row_terms(x, grad_out, method, row_scores, transposed) -> tuple[torch.Tensor, list[RowTerms]]:
    x2d, g2d = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    terms = torch.einsum("io,ij->ioj", g2d, x2d)
    if transposed:
        terms = terms.transpose(1, 2)
    exact = terms.sum(0)
    winners = torch.zeros(x2d.shape[0], dtype=torch.bool)
    if method == "wta_crs":
        from test_sampling import paper_winner_count

        probs = row_probabilities(x2d.float(), None if row_scores is None else row_scores.reshape(-1).float())
        k = num_kept_rows(x2d.shape[0], 0.3)
        c = paper_winner_count(probs, k)
        assert c > 0, "heavy-tailed rows should give WTA winners"
        winners[probs.topk(c).indices] = True
    return exact, [RowTerms(slice(0, exact.numel()), terms.reshape(x2d.shape[0], -1), winners)]


@pytest.mark.parametrize(
    ("method", "case"),
    [("wta_crs", "plain"), ("crs", "plain"), ("uniform", "plain"), ("wta_crs", "row_scores"), ("wta_crs", "conv1d")],
)
def test_grad_weight_unbiased(method, case):
    """The mean of sampled grad_weights equals grad_y.T @ x, per entry and per branch (winners, drawn rows), with
    enough draws to catch a 5% scale bias of either branch (conftest.check_unbiased, projections on the row
    terms); also with row scores that are zero for the heaviest rows, and in the transposed (Conv1D) layout."""
    x, grad_out, row_scores = _unbiased_case(case)
    transposed = case == "conv1d"
    weight = nn.Parameter(torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    exact, parts = _row_terms(x, grad_out, method, row_scores, transposed)
    g = torch.Generator().manual_seed(4)

    def sample(n: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            weight.grad = None
            sampled_linear(x, weight, None, 0.3, method, row_scores, g, transposed=transposed).backward(grad_out)
            out.append(weight.grad)
        return torch.stack(out)

    branches, directions = row_term_branches(parts, exact.numel())
    check_unbiased(sample, exact, branches, directions=directions,
                   rounding=float64_rounding(exact).reshape(-1) + scale_rounding(parts, exact.numel()),
                   name=f"grad_weight {method} {case}")


def test_topk_grad_weight_is_flagged():
    x, grad_out, _ = _unbiased_case("plain")
    weight = nn.Parameter(torch.randn(8, 8, dtype=torch.float64))
    exact = grad_out.reshape(-1, 8).T @ x.reshape(-1, 8)

    def sample(n: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            weight.grad = None
            sampled_linear(x, weight, None, 0.3, "topk").backward(grad_out)
            out.append(weight.grad)
        return torch.stack(out)

    with pytest.raises(AssertionError, match="biased"):
        check_unbiased(sample, exact, {"drawn": exact}, name="topk", pilot=10, min_draws=20)


def _saved(layer: nn.Linear, x: torch.Tensor, **kwargs):
    return saved_tensors_of(lambda: sampled_linear(x, layer.weight, layer.bias, **kwargs), *layer.parameters())


@pytest.mark.parametrize("budget", [0.3, 0.1, 0.05])
@pytest.mark.parametrize("method", ["wta_crs", "crs", "uniform", "topk"])
def test_stores_exactly_k_rows_indices_and_scales(budget, method, gen):
    layer = _linear(64, 32)
    x = heavy(2 * 500, 64, seed=0).reshape(2, 500, 64).requires_grad_(True)
    saved, y = _saved(layer, x, budget=budget, method=method, generator=gen)
    k = num_kept_rows(1000, budget)
    assert x not in saved
    rows, indices, scales = y.grad_fn.saved_tensors[1:4]
    assert rows.shape == (k, 64) and rows.dtype == torch.float32
    assert indices.shape == scales.shape == (k,) and indices.dtype == torch.int64 and scales.dtype == torch.float32
    assert saved.nbytes == k * (64 * 4 + 8 + 4)  # k rows, an int64 index and a float32 scale per slot; nothing else


def test_budget_one_stores_what_nn_linear_stores(gen):
    layer = _linear(64, 32)
    x = torch.randn(300, 64, generator=gen, requires_grad=True)
    ref, _ = saved_tensors_of(lambda: layer(x), *layer.parameters())
    saved, _ = _saved(layer, x, budget=1.0)
    assert saved.nbytes == ref.nbytes == x.numel() * 4
    assert x in saved


def test_input_saved_by_relu_anyway_is_kept_by_reference(gen):
    """x is a ReLU output (ReLU keeps it for its own backward): the layer keeps it whole at no extra cost, and its
    gradient is exact."""
    layer = _linear(16, 8)
    h = torch.randn(200, 16, generator=gen, requires_grad=True)
    x = torch.relu(h)
    y = sampled_linear(x, layer.weight, None, 0.3, generator=gen)
    rows, indices = y.grad_fn.saved_tensors[1:3]
    assert indices is None and rows.data_ptr() == x.data_ptr()
    grad_out = torch.randn(200, 8, generator=gen)
    y.backward(grad_out)
    assert_within(layer.weight.grad, grad_out.T @ x.detach(),
                  sum_rounding(grad_out.abs().T.double() @ x.detach().abs().double(), 200, torch.float32))


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
    assert torch.equal(i1, i2) and torch.equal(g1, g2)  # the same kernels in the same order
    assert not torch.equal(i1, i3)


def test_gradient_is_the_sum_over_slots(gen):
    """grad_weight = sum_t scale_t outer(grad_y[i_t], x[i_t]) over the k slots, duplicates included."""
    layer = _linear(8, 4)
    x = heavy(200, 8, seed=0)
    grad_out = torch.randn(200, 4, generator=gen)
    y = sampled_linear(x, layer.weight, None, 0.1, "crs", generator=gen)
    _, indices, scales = y.grad_fn.saved_tensors[1:4]
    y.backward(grad_out)
    terms = grad_out[indices].double() * scales.double()[:, None]
    expected = terms.T @ x[indices].double()
    assert_within(layer.weight.grad, expected,
                  sum_rounding(terms.abs().T @ x[indices].abs().double(), len(indices), torch.float32))


def test_shared_kept_rows_are_stored_once(gen):
    """Q, K and V reading one x share one sample: the rows are saved once, each gradient uses them."""
    layers = [_linear(32, 16, seed=s) for s in range(3)]
    x = heavy(400, 32, seed=0).requires_grad_(True)
    params = [p for layer in layers for p in layer.parameters()]

    def forward():
        kept = keep_rows(x, 0.3, generator=gen)
        return kept, [sampled_linear(x, m.weight, m.bias, kept=kept) for m in layers]

    saved, (kept, outs) = saved_tensors_of(forward, *params)
    assert saved.nbytes == sum(t.numel() * t.element_size() for t in (kept.rows, kept.indices, kept.scales))
    sum(o.sum() for o in outs).backward()
    scaled = torch.ones(kept.rows.shape[0], 16, dtype=torch.float64) * kept.scales.double().unsqueeze(1)
    expected = scaled.T @ kept.rows.double()
    bound = sum_rounding(scaled.abs().T @ kept.rows.abs().double(), kept.rows.shape[0], torch.float32)
    for layer in layers:
        assert_within(layer.weight.grad, expected, bound)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers(dtype, gen):
    layer = _linear(32, 16, dtype=dtype)
    x = heavy(300, 32, seed=0).to(dtype)
    grad_out = torch.randn(300, 16, generator=gen).to(dtype)
    ref = _grads(layer, x, layer, grad_out)
    got = _grads(lambda t: sampled_linear(t, layer.weight, layer.bias, 0.3, generator=gen), x, layer, grad_out)
    assert torch.equal(got["out"], ref["out"])  # the same F.linear
    bounds = exact_parts_bounds(x, layer.weight, grad_out)
    assert_within(got["x"], ref["x"], bounds["x"])
    assert_within(got["bias"], ref["bias"], bounds["bias"])
    assert got["weight"].dtype == dtype and bool(torch.isfinite(got["weight"]).all())
    y = sampled_linear(x.requires_grad_(True), layer.weight, layer.bias, 0.3, generator=gen)
    rows, indices, scales = y.grad_fn.saved_tensors[1:4]
    assert rows.dtype == dtype and indices.dtype == torch.int64 and scales.dtype == torch.float32


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
    assert got["out"].dtype == dtype and got["weight"].dtype == torch.float32
    # Both compute in the autocast dtype from the same inputs cast once: the bounds of that dtype's kernels.
    w_low = layer.weight.detach().to(dtype)
    with_bias = torch.cat([x.to(dtype), torch.ones(300, 1, dtype=dtype)], 1)  # addmm adds the bias in the sum
    assert_within(got["out"], ref["out"], product_bound(with_bias, torch.cat([w_low.T, layer.bias.to(dtype)[None]]),
                                                        dtype))
    bounds = exact_parts_bounds(x.to(dtype), w_low, grad_out)
    assert_within(got["x"], ref["x"], bounds["x"])
    assert_within(got["bias"], ref["bias"], bounds["bias"])
    assert bool(torch.isfinite(got["weight"]).all())

    xg = x.clone().requires_grad_(True)
    saved, y = saved_tensors_of(lambda: got_fn(xg), *layer.parameters())
    rows, indices, scales = y.grad_fn.saved_tensors[1:4]
    assert rows.dtype == dtype and indices.dtype == torch.int64 and scales.dtype == torch.float32
    assert saved.nbytes == rows.numel() * rows.element_size() + indices.numel() * 8 + scales.numel() * 4


def test_tiny_probabilities_do_not_overflow_fp16(gen):
    """A kept row drawn with p ~ 1e-7 carries a scale ~ 1e6, beyond fp16's range: the gradient stays finite and
    matches the same estimate computed in fp32 (to fp16's rounding of the result)."""
    n, d_in, d_out = 50, 8, 4
    layer = _linear(d_in, d_out, dtype=torch.float16)
    x = (torch.randn(n, d_in, generator=gen) * 1e-3).half()
    grad_out = torch.randn(n, d_out, generator=gen).half()
    indices = torch.tensor([3, 17, 40])
    scales = torch.tensor([1e6, 2.5e5, 1.0])
    kept = KeptRows(x.index_select(0, indices), indices, scales, n)
    layer.weight.grad = None
    sampled_linear(x, layer.weight, None, kept=kept).backward(grad_out)
    terms = grad_out.double()[indices] * scales.double().unsqueeze(1)
    expected = terms.T @ x.double()[indices]
    assert bool(torch.isfinite(layer.weight.grad).all())
    bound = sum_rounding(terms.abs().T @ x.double()[indices].abs(), 3, torch.float32)
    assert_within(layer.weight.grad, expected, bound + torch.finfo(torch.float16).eps * expected.abs())


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
    assert torch.equal(got["out"], ref["out"])  # Conv1D's own addmm on the same inputs
    bounds = exact_parts_bounds(x, conv.weight.T, grad_out)
    assert_within(got["x"], ref["x"], bounds["x"])
    assert_within(got["bias"], ref["bias"], bounds["bias"])
    assert got["weight"].shape == (5, 6)
    exact = _grads(lambda t: sampled_linear(t, conv.weight, conv.bias, 1.0, transposed=True), x, conv, grad_out)
    assert all(torch.equal(exact[name], ref[name]) for name in ref)  # budget 1.0: the same addmm graph


def test_row_probabilities_floor_keeps_every_nonzero_row_drawable():
    x = torch.randn(20, 4)
    x[7] = 0.0
    scores = torch.zeros(20)
    scores[0] = 5.0  # a stale estimate that says zero for almost every row
    p = row_probabilities(x, scores, floor=0.1)
    norms = x.norm(dim=1)
    assert p[7] == 0 and bool((p[torch.arange(20) != 7] > 0).all())
    torch.testing.assert_close(p, norms * torch.clamp(scores, min=0.1 * scores.mean()), rtol=1e-6, atol=0)
    torch.testing.assert_close(row_probabilities(x), norms, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0.0}, r"budget must be in \(0, 1\].*got 0.0"),
        ({"budget": -0.5}, r"budget must be in \(0, 1\].*got -0.5"),
        ({"budget": 1.5}, r"budget must be in \(0, 1\].*got 1.5"),
        ({"budget": math.nan}, r"budget must be in \(0, 1\].*got nan"),
        ({"method": "random"}, "method must be one of 'wta_crs', 'crs', 'uniform', 'topk'; got 'random'"),
        ({"floor": 0.0}, r"floor must be in \(0, 1\]"),
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


@pytest.mark.parametrize("where", ["input NaN", "input Inf", "score negative", "score NaN"])
def test_non_finite_input_or_bad_scores_make_the_weight_gradient_nan(where, gen):
    """Not read back (no device sync): the kept scales become NaN, so grad_weight is NaN, as without sampling;
    grad_x stays what autograd gives (wtacrs.health raises for layers with a sampler)."""
    layer = _linear(8, 3)
    x = torch.randn(40, 8, generator=gen)
    scores = torch.ones(40)
    if where == "input NaN":
        x[11, 2] = math.nan
    elif where == "input Inf":
        x[11, 2] = math.inf
    elif where == "score negative":
        scores[5] = -1e-3  # even one: the floor's mix would be positive, but the score is wrong
    else:
        scores[5] = math.nan
    sampled_linear(x, layer.weight, None, 0.3, row_scores=scores, generator=gen).sum().backward()
    assert bool(layer.weight.grad.isnan().all())


def test_mismatched_inputs(gen):
    layer = _linear(8, 3)
    with pytest.raises(ValueError, match="x has 7 features but the weight of shape"):
        sampled_linear(torch.randn(20, 7), layer.weight, layer.bias)
    kept = keep_rows(torch.randn(30, 8), 0.3, generator=gen)
    with pytest.raises(ValueError, match="kept rows were sampled from an input of 30 rows"):
        sampled_linear(torch.randn(20, 8), layer.weight, layer.bias, kept=kept)


class _Ops(TorchDispatchMode):
    """Names of the ATen ops that run while active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("needs", ["weight", "x", "bias"])
def test_function_skips_unneeded_gradients(needs, gen):
    """Backward computes only the gradients autograd asks for: with only the weight (only x, only the bias)
    needing one, no product for grad_x (no gather/scale/product for grad_w, no sum for grad_b) runs."""
    layer = _linear(8, 3)
    layer.weight.requires_grad_(needs == "weight")
    layer.bias.requires_grad_(needs == "bias")
    x = torch.randn(40, 8, generator=gen, requires_grad=needs == "x")
    kept = keep_rows(x.detach(), 0.3, generator=gen)
    y = apply_sampled_linear(x, layer.weight, layer.bias, kept)
    grad_out = torch.randn(40, 3, generator=gen)
    with _Ops() as ops:
        y.backward(grad_out)
    products = [n for n in ops.names if n in ("mm", "matmul", "addmm", "bmm")]
    gathers = [n for n in ops.names if n in ("index_select", "index", "gather")]
    sums = [n for n in ops.names if n in ("sum", "add")]
    assert len(products) == (0 if needs == "bias" else 1), ops.names
    assert bool(gathers) == (needs == "weight"), ops.names
    assert bool(sums) == (needs == "bias"), ops.names
    grads = {"x": x.grad, "weight": layer.weight.grad, "bias": layer.bias.grad}
    assert all((g is not None) == (name == needs) for name, g in grads.items())
