"""The Triton kernels of ``wtacrs.kernels``, each against its PyTorch reference, on CPU with Triton's interpreter.

Kernels whose reference does the same arithmetic (gathers, masks, one multiply per element) must match it bit for bit
(NaN payloads aside: they differ between devices). Row norms sum in another order, so they match within the
rounding bound of a float32 sum of ``d`` squares.

Run by ``tests/test_kernels.py`` in a process of its own under ``TRITON_INTERPRET=1`` (``tests/interpreted.py``);
directly: ``TRITON_INTERPRET=1 pytest tests/kernel_cases.py``.
"""

from __future__ import annotations

import pytest
import torch
from interpreted import interpreting

from wtacrs import kernels
from wtacrs.kernels import bits, rows

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS32 = torch.finfo(torch.float32).eps

if not interpreting():
    raise RuntimeError("tests/kernel_cases.py runs the Triton kernels on CPU: run it with TRITON_INTERPRET=1")


def test_cpu_tensors_take_the_triton_path_here():
    from wtacrs.kernels.dispatch import use_triton

    from wtacrs.kernels import rows_triton

    assert use_triton(torch.zeros(1))
    assert type(rows_triton._row_norms_kernel).__name__ == "InterpretedFunction"


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal dtype, shape and bits, NaN wherever the other has NaN (whatever its payload)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if not a.is_floating_point():
        assert torch.equal(a, b)
        return
    nan = a.isnan()
    assert torch.equal(nan, b.isnan())
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    assert torch.equal(a[~nan].view(ints), b[~nan].view(ints))


def with_bad_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a NaN, an Inf, a -Inf and a zero row (where it has that many rows)."""
    x = x.clone()
    for row, value in zip(range(1, x.shape[0], 2), (float("nan"), float("inf"), float("-inf"), 0.0)):
        x[row] = 0.0
        x[row, row % x.shape[1]] = value
    return x


def randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


SHAPES = [(1, 1), (7, 13), (33, 1000), (130, 64), (5, 1500)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_row_norms(shape, dtype, transposed):
    x = with_bad_rows(randn(*shape, dtype=dtype, seed=1) * 3)
    if transposed:
        x = x.T.contiguous().T  # same values, column-major
    out = kernels.row_norms(x)
    ref = rows.row_norms_reference(x)
    assert out.dtype == torch.float32 and out.shape == (shape[0],)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    # Two float32 sums of d squares in different orders differ by at most 2 * d * u of the sum (u = eps / 2);
    # the square root halves a relative error and adds one rounding.
    d = shape[1]
    torch.testing.assert_close(out, ref, rtol=(d + 1) * EPS32, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (40, 13), (300, 1030)], ids=str)
def test_gather_scale_rows(shape, index_dtype, dtype):
    n, d = shape
    g = with_bad_rows(randn(n, d, dtype=dtype, seed=2))
    k = max(1, n // 3) + 2
    gen = torch.Generator().manual_seed(3)
    indices = torch.randint(0, n, (k,), generator=gen).to(index_dtype)
    indices[: min(3, n)] = torch.arange(min(3, n)).to(index_dtype)  # the bad rows are drawn
    scales = torch.rand(k, generator=gen) * 1e4  # large scales: float16 results need float32
    scales[-1] = float("nan")
    out = kernels.gather_scale_rows(g, indices, scales)
    ref = rows.gather_scale_rows_reference(g, indices, scales)
    assert out.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    same(out, ref)


def test_gather_scale_rows_of_a_strided_gradient():
    g = randn(50, 24, seed=4).T.contiguous().T
    indices = torch.tensor([3, 3, 49, 0])
    scales = torch.tensor([1.5, 2.0, 7.0, 0.25])
    same(kernels.gather_scale_rows(g, indices, scales), rows.gather_scale_rows_reference(g, indices, scales))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4099, 12345])
def test_pack_and_unpack_bits(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = kernels.pack_bits(mask)
    same(packed, bits.pack_bits_reference(mask))
    same(kernels.unpack_bits(packed, n), bits.unpack_bits_reference(packed, n))
    assert torch.equal(kernels.unpack_bits(packed, n), mask)


def test_pack_bits_of_strided_and_zero_one_tensors():
    mask = torch.rand(37, 29, generator=torch.Generator().manual_seed(5)) > 0.3
    same(kernels.pack_bits(mask.T), bits.pack_bits_reference(mask.T))
    noise = mask.to(torch.bfloat16)  # 0s and 1s of a float dtype, as dropout's noise before scaling
    same(kernels.pack_bits(noise), bits.pack_bits_reference(noise))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inplace", [False, True])
def test_relu_with_mask(dtype, inplace):
    x = randn(37, 29, dtype=dtype, seed=6)
    x[0, :5] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf")], dtype=dtype)
    a, b = x.clone(), x.clone()
    out, packed = kernels.relu_with_mask(a, inplace)
    ref, ref_packed = bits.relu_with_mask_reference(b, inplace)
    same(out, ref)
    same(packed, ref_packed)
    assert (out is a) == inplace


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [None, 1 / 0.9, 1 / 0.63, "tensor"], ids=["relu", "p0.1", "p0.37", "cpu-dropout"])
@pytest.mark.parametrize("shape", [(5,), (37, 29), (3, 8, 129)], ids=str)
def test_masked_grad(shape, scale, dtype):
    grad = with_bad_rows(randn(*shape, dtype=dtype, seed=7).reshape(shape[0], -1)).reshape(shape)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(8)) > 0.4
    packed = bits.pack_bits_reference(mask)
    if scale == "tensor":
        scale = torch.ones((), dtype=dtype).div_(0.63)  # CPU dropout's kept value, rounded to the dtype
    out = kernels.masked_grad(grad, packed, scale)
    same(out, bits.masked_grad_reference(grad, packed, scale))


def test_masked_grad_of_an_expanded_gradient():
    grad = torch.ones(()).expand(6, 10)  # the gradient of a sum: stride 0
    packed = bits.pack_bits_reference(torch.arange(60).reshape(6, 10) % 3 == 0)
    same(kernels.masked_grad(grad, packed), bits.masked_grad_reference(grad, packed))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (40, 13), (300, 70)], ids=str)
def test_row_weights(shape, dtype):
    n, d = shape
    x = with_bad_rows(randn(n, d, dtype=dtype, seed=9))
    gen = torch.Generator().manual_seed(10)
    scores, ids = torch.rand(50, generator=gen), torch.randint(0, 50, (n,), generator=gen)
    out, ref = kernels.row_weights(x, scores, ids), rows.row_weights_reference(x, scores, ids)
    # The norm's rounding (see test_row_norms) and one multiply.
    torch.testing.assert_close(out, ref, rtol=(d + 2) * EPS32, atol=0, equal_nan=True)


def heavy_weights(g: int, n: int, seed: int) -> torch.Tensor:
    """Weights with a heavy tail, as row norms are: some winners, the rest drawn."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(g, n, generator=gen) ** 8 * 100 + torch.rand(g, n, generator=gen)


def draw_inputs(p: torch.Tensor, k: int):
    from wtacrs.sampling import _safe

    safe = _safe(p)
    top_p, top_idx = torch.topk(safe, k, dim=-1, sorted=True)
    return safe, top_p, top_idx


@pytest.mark.parametrize("g, n, k", [(1, 2, 1), (1, 40, 12), (1, 3000, 900), (37, 128, 39), (6, 12, 10)])
def test_wta_crs_rest(g, n, k):
    from wtacrs.kernels import draws

    p = heavy_weights(g, n, seed=n)
    if g > 2:  # non-finite weights and an all-zero row
        p[0, 3], p[1, 5], p[2] = float("nan"), float("inf"), 0.0
    safe, top_p, top_idx = draw_inputs(p, k)
    counter, ref_counter = torch.zeros(()), torch.zeros(())
    rest_p, stats = kernels.wta_crs_rest(p, safe, top_p, top_idx, counter)
    ref_rest_p, ref_stats = draws.wta_crs_rest_reference(p, safe, top_p, top_idx, ref_counter)
    # The winner count and the winners zeroed are the same; the sums differ by their order only: at most n
    # roundings of the total (summing in float32; the reference's cumsum accumulates in float64 on CPU).
    assert torch.equal(stats[:, 0], ref_stats[:, 0])
    same(rest_p, ref_rest_p)
    torch.testing.assert_close(stats[:, 1], ref_stats[:, 1], rtol=n * EPS32, atol=0, equal_nan=True)
    torch.testing.assert_close(counter, ref_counter, rtol=g * n * EPS32, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("g, n, k, d", [(1, 2, 1, 5), (1, 40, 12, 33), (1, 3000, 900, 16), (37, 128, 39, 0)])
def test_wta_crs_slots(g, n, k, d, dtype):
    from wtacrs.kernels import draws

    p = heavy_weights(g, n, seed=n + 1)
    p[0, 0] = float("nan") if g > 1 else p[0, 0]  # a non-finite row: every scale NaN
    safe, top_p, top_idx = draw_inputs(p, k)
    rest_p, stats = draws.wta_crs_rest_reference(p, safe, top_p, top_idx)
    drawn = torch.multinomial(rest_p, k, replacement=True, generator=torch.Generator().manual_seed(11))
    x = randn(n, d, seed=12) if d else None  # rows are gathered for one row of weights (a layer's input)
    indices, scales, kept = kernels.wta_crs_slots(safe, top_idx, drawn, stats, x, dtype)
    ref = draws.wta_crs_slots_reference(safe, top_idx, drawn, stats, x, dtype)
    same(indices, ref[0])
    same(scales, ref[1])  # the same division of the same numbers
    assert (kept is None) == (ref[2] is None)
    if kept is not None:
        same(kept, ref[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, d", [(1, 3), (48, 32), (2000, 20)])
def test_token_norm_sums(n, d, dtype):
    g = randn(n, d, dtype=dtype, seed=13)
    ids = torch.randint(0, 30, (n,), generator=torch.Generator().manual_seed(14))
    out, ref = kernels.token_norm_sums(g, ids, 30), rows.token_norm_sums_reference(g, ids, 30)
    assert torch.equal(out[:, 1], ref[:, 1])  # counts
    # Each sum adds up to n terms, each a norm (see test_row_norms) over a mean of n norms, in another order.
    torch.testing.assert_close(out[:, 0], ref[:, 0], rtol=(d + 2 * n + 2) * EPS32, atol=0)


@pytest.mark.parametrize("value_dtype", [None, torch.float32], ids=["value-in-rows-dtype", "float32-value"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gathered", [True, False])
def test_masked_rows(gathered, dtype, value_dtype):
    n, d, k = 30, 24, 11
    x = with_bad_rows(randn(n, d, dtype=dtype, seed=15))
    packed = bits.pack_bits_reference(torch.rand(n, d, generator=torch.Generator().manual_seed(16)) > 0.3)
    indices = torch.randint(0, n, (k,), generator=torch.Generator().manual_seed(17)) if gathered else None
    kept = x[indices] if gathered else x
    value = torch.ones((), dtype=value_dtype or dtype).div_(0.7)
    same(kernels.masked_rows(kept, indices, packed, value), bits.masked_rows_reference(kept, indices, packed, value))


@pytest.mark.parametrize("v", [1, 100, 3000])
def test_fold_token_stats(v):
    from wtacrs.kernels import stats

    gen = torch.Generator().manual_seed(v)
    table = torch.rand(v, generator=gen) * 3
    table[torch.rand(v, generator=gen) < 0.3] = float("nan")  # not seen yet
    counts = torch.randint(0, 4, (v,), generator=gen).float()
    sums = torch.rand(v, generator=gen) * counts * 2
    if v > 1:
        sums[0], counts[0] = float("inf"), 2.0  # an overflowed step: the old value stays
    grad = torch.stack((sums, counts), 1)
    out, ref = kernels.fold_token_stats(table, grad, 0.9, 0.1), stats.fold_token_stats_reference(table, grad, 0.9, 0.1)
    torch.testing.assert_close(out[0], ref[0], rtol=2 * EPS32, atol=0, equal_nan=True)  # one fused multiply-add
    # The mean over seen tokens sums up to v values in another order.
    torch.testing.assert_close(out[1], ref[1], rtol=(v + 4) * EPS32, atol=0)
