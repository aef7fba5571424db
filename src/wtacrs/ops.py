"""The sampled linear op: exact forward, only sampled rows of the input kept for backward.

``y = F.linear(x, W, b)`` is computed exactly. Backward needs ``x`` only for ``grad_W = grad_y.T @ x``; that sum
over rows is replaced by an unbiased estimate from ``k`` slots (row index, scale) chosen by ``wtacrs.sampling``.
So the op saves ``x[indices]`` (x's dtype, or the autocast dtype), the int64 indices and float32
scales, and nothing of x's full size. ``grad_x`` and ``grad_b`` are exact.

A training step runs without a device sync: ``k`` is fixed by the budget and the row count, and the checks of
the input's values go through ``wtacrs.health`` (a non-finite input makes that step's weight gradient NaN and
raises at a later forward) instead of being read back.

GPT-2-style ``Conv1D`` layers (weight of shape (in, out), ``y = addmm(b, x, W)``) are served by the same op
with ``transposed=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .gradstats import TokenGradStats
from .sampling import DEFAULT_MIN_ROWS, Method, check_budget, check_method, draw_rows, num_kept_rows

#: Share of the row probabilities taken from activation norms when rows are weighted by gradient estimates (row
#: scores, token statistics), so that every row whose input is non-zero keeps p > 0 (unbiasedness needs it even
#: when an estimate is stale or zero).
DEFAULT_FLOOR = 0.1

#: Autograd nodes that save their own output for backward. A layer reading such an output keeps all of it at no
#: extra cost (the same storage is already held), so it takes the exact gradient instead of a sample.
_OUTPUT_SAVING_NODES = frozenset({"ReluBackward0", "SoftmaxBackward0", "TanhBackward0", "SigmoidBackward0"})


@dataclass(frozen=True)
class KeptRows:
    """Rows of a layer input kept for the weight gradient.

    ``indices is None`` means every row is kept with scale 1 (``rows`` is then the whole input, not a copy,
    unless autocast changed its dtype).
    """

    rows: Tensor  # (k, d_in), the input's dtype (the autocast dtype under autocast)
    indices: Tensor | None  # (k,) int64; a row may fill several slots
    scales: Tensor | None  # (k,) float32
    num_rows: int  # N, the input's row count
    already_saved_by: str | None = None  # the autograd node that saves the whole input anyway, if any
    # The layer reads dropout(rows' input) rather than that input: (packed keep-mask of the whole input, kept value);
    # its rows are rebuilt in backward as rows * mask rows * value (wtacrs.lora).
    dropout: tuple[Tensor, Tensor] | None = None


def check_floor(floor: float) -> None:
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or math.isnan(floor) or not 0.0 < floor <= 1.0:
        raise ValueError(
            f"floor must be in (0, 1], the share of p taken from activation norms so that every non-zero row "
            f"can be drawn; got {floor!r}"
        )


def row_probabilities(x2d: Tensor, row_scores: Tensor | None = None, floor: float = DEFAULT_FLOOR) -> Tensor:
    """Row weights for sampling the rows of ``x2d`` (N, d): float32 (N,).

    Without scores: ``||x_i||``. With row scores ``s_i``, estimates of the output-gradient norms ``||dy_i||``:
    ``||x_i|| * max(s_i, floor * mean(s))``, the variance-minimising weight with every score raised to at least
    ``floor`` times the mean, so that every row with a non-zero input keeps p > 0 even where a score is stale or
    zero. A NaN or Inf (input or score) makes the weights non-finite; callers check that.
    """
    norms = kernels.row_norms(x2d)
    if row_scores is None:
        return norms
    return norms * torch.maximum(row_scores, row_scores.mean() * floor)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a linear layer reading ``x`` computes in: the autocast dtype where autocast would cast ``x``
    (floating point other than float64), else ``x``'s own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
        what = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor of shape (..., in_features); got {what}")


def check_row_scores(row_scores: Tensor, x: Tensor) -> None:
    if not isinstance(row_scores, Tensor) or not row_scores.is_floating_point():
        what = row_scores.dtype if isinstance(row_scores, Tensor) else type(row_scores).__name__
        raise ValueError(f"row_scores must be a floating-point tensor; got {what}")
    rows = x.shape[:-1]
    if row_scores.shape not in (rows, (math.prod(rows),)):
        raise ValueError(
            f"row_scores must have shape {tuple(rows)} (x's shape without its last dim) or ({math.prod(rows)},); "
            f"got {tuple(row_scores.shape)}"
        )


def sample_kept_rows(
    x: Tensor,
    k: int,
    probs: Tensor,
    method: str,
    generator: torch.Generator | None,
    counter: Tensor | None,
) -> KeptRows:
    """Keep ``k < N`` slots of the rows of ``x`` (..., d) drawn with weights ``probs`` (N,), without a host sync.

    Non-finite weights (from a NaN or Inf input, or a bad score) make their sum, which is added to ``counter``
    (see ``wtacrs.health``), non-finite, and every scale NaN, so the weight gradient is NaN as it would be without
    sampling.
    """
    with torch.no_grad():
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        indices, scales, rows = draw_rows(probs, k, method, generator, counter, x2d, compute_dtype(x))
        return KeptRows(rows, indices, scales, x2d.shape[0])


def keep_rows(
    x: Tensor,
    budget: float,
    method: Method = "wta_crs",
    row_scores: Tensor | None = None,
    generator: torch.Generator | None = None,
    min_rows: int = DEFAULT_MIN_ROWS,
    floor: float = DEFAULT_FLOOR,
) -> KeptRows:
    """Sample the rows of ``x`` (..., d_in) to keep for the weight gradient of a linear layer reading ``x``.

    One ``KeptRows`` may serve several layers that read the same ``x``: each layer's gradient estimate stays
    unbiased and the rows are stored once. Under autocast the rows are stored in the autocast dtype, the
    dtype the layers compute in.

    Nothing is stored twice: if ``x`` is the output of an op that saves its output anyway (ReLU, softmax, tanh,
    sigmoid), all of ``x`` is kept by reference and the gradient is exact.

    A NaN or Inf in ``x`` (or a NaN, Inf or negative score) is not read back here: the kept scales become NaN, so
    the weight gradient is NaN (as without sampling). ``apply_wtacrs`` and ``SampledLinear`` also raise a clear
    error at a later forward (``wtacrs.health``).
    """
    check_budget(budget)
    check_method(method)
    check_floor(floor)
    _check_input(x)
    if row_scores is not None:
        check_row_scores(row_scores, x)
    n = math.prod(x.shape[:-1])
    k = num_kept_rows(n, budget, min_rows)
    whole = keep_whole(x, k)
    if whole is not None:
        return whole
    with torch.no_grad():
        scores = None if row_scores is None else sanitized_scores(row_scores.reshape(-1).float())
        probs = row_probabilities(x.reshape(-1, x.shape[-1]), scores, floor)
    return sample_kept_rows(x, k, probs, method, generator, None)


def sanitized_scores(scores: Tensor) -> Tensor:
    """NaN for entries that are NaN, Inf or negative, so that the row weights become non-finite (and get reported)."""
    return torch.where(scores.isfinite() & (scores >= 0), scores, math.nan)


def keep_whole(x: Tensor, k: int) -> KeptRows | None:
    """``KeptRows`` holding all of ``x`` when the budget covers every row or when another op keeps ``x`` anyway."""
    n = math.prod(x.shape[:-1])
    dtype = compute_dtype(x)
    if k >= n:
        return KeptRows(x.detach().to(dtype), None, None, n)
    if torch.compiler.is_compiling():  # the compiler decides what to keep; grad_fn is not traced
        return None
    producer = type(x.grad_fn).__name__ if x.grad_fn is not None and x._base is None else None
    if producer in _OUTPUT_SAVING_NODES and dtype == x.dtype:
        return KeptRows(x.detach(), None, None, n, already_saved_by=producer)
    return None


def exact_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, transposed: bool = False) -> Tensor:
    """``F.linear``, or with ``transposed`` exactly what ``transformers``' ``Conv1D`` computes."""
    if not transposed:
        return F.linear(x, weight, bias)
    x2d = x.reshape(-1, x.shape[-1])
    out = x2d @ weight if bias is None else torch.addmm(bias, x2d, weight)
    return out.view(*x.shape[:-1], weight.shape[-1])


class SampledLinearFunction(torch.autograd.Function):
    """``F.linear`` whose weight gradient is estimated from kept rows; see ``sampled_linear``.

    With ``transposed=True`` the weight is (in, out) and the forward is ``Conv1D``'s ``addmm``. The weight is saved
    as given (a parameter, no copy) and cast to the gradient's dtype in backward, so under autocast no
    low-precision weight copy is kept for backward. ``probe`` and ``ids`` (optional) route
    this call's output-gradient norms per token to the sampler (``apply_sampled_linear``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, rows, indices, scales, probe, ids, mask, mask_value, transposed: bool):
        ctx.transposed = transposed
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.probe_rows = None if probe is None else probe.shape[0]  # the probe itself is not kept
        ctx.save_for_backward(weight, rows, indices, scales, ids, mask, mask_value)
        return exact_linear(x, weight, bias, transposed)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weight, rows, indices, scales, ids, mask, mask_value = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        dtype = grad_2d.dtype
        grad_x = grad_w = grad_b = grad_probe = None
        if ctx.needs_input_grad[0]:
            w = _as(weight, dtype)
            grad_x = torch.matmul(grad_out, w.T if ctx.transposed else w)  # (..., in): x's shape
        if ctx.needs_input_grad[1]:
            kept_grad = grad_2d if indices is None else kernels.gather_scale_rows(grad_2d, indices, scales)
            rows2d = rows if rows.dim() == 2 else rows.view(-1, rows.shape[-1])
            if mask is not None:
                # The rows of dropout(input) (wtacrs.lora); rows of d elements, d a multiple of 8, are whole
                # bytes of the packed mask.
                rows2d = kernels.masked_rows(rows2d, indices, mask, mask_value)
            rows2d = _as(rows2d, kept_grad.dtype)
            grad_w = _as(rows2d.T @ kept_grad if ctx.transposed else kept_grad.T @ rows2d, weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = _as(grad_2d.sum(0), ctx.bias_dtype)
        if ctx.needs_input_grad[6]:
            grad_probe = (grad_2d.new_zeros(ctx.probe_rows, 2, dtype=torch.float32) if ids is None
                          else TokenGradStats.contribution(grad_2d, ids, ctx.probe_rows))
        return grad_x, grad_w, grad_b, None, None, None, grad_probe, None, None, None, None


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def apply_sampled_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, kept: KeptRows, transposed: bool = False,
    report: tuple[Tensor, Tensor | None] | None = None,
) -> Tensor:
    """The autograd op on rows already kept (no checks): what the sampled layers call. With ``report`` =
    (the sampler's probe, the rows' token ids, flat and in range), backward gives the probe its output-gradient
    norms per token (zeros without ids; see ``wtacrs.sampler``)."""
    probe, ids = (None, None) if report is None else report
    mask, mask_value = (None, None) if kept.dropout is None else kept.dropout
    return SampledLinearFunction.apply(x, weight, bias, kept.rows, kept.indices, kept.scales, probe, ids,
                                       mask, mask_value, transposed)


def sampled_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    budget: float = 0.3,
    method: Method = "wta_crs",
    row_scores: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    min_rows: int = DEFAULT_MIN_ROWS,
    floor: float = DEFAULT_FLOOR,
    kept: KeptRows | None = None,
    transposed: bool = False,
) -> Tensor:
    """``F.linear(x, weight, bias)`` that saves only sampled rows of ``x`` for the weight gradient.

    Forward is bit-identical to ``F.linear``; ``grad_x`` and ``grad_bias`` are exact; ``grad_weight`` is an
    unbiased estimate of ``grad_y.T @ x`` (plain PyTorch) from ``k = clamp(ceil(budget * N), min_rows, N)`` slots,
    N = the number of rows of ``x`` (all leading dims flattened).

    Args:
        x: (..., in_features).
        weight: (out_features, in_features), or (in_features, out_features) with ``transposed``.
        budget: fraction of rows kept, in (0, 1]; 1.0 is exactly ``F.linear``.
        method: ``"wta_crs"`` (default), ``"crs"``, ``"uniform"`` or ``"topk"`` (biased; ablation only).
        row_scores: optional per-row scores (shape ``x.shape[:-1]``), e.g. cached output-gradient norms; mixed
            with activation norms by ``floor`` so that every non-zero row keeps a positive probability.
        generator: optional ``torch.Generator`` for reproducible sampling.
        kept: rows already sampled from this same ``x`` (``keep_rows``), to share one sample among the layers
            that read ``x``; the sampling arguments are then unused.
        transposed: the weight is (in, out) and the forward is ``torch.addmm(bias, x2d, weight)``, bit for bit
            what GPT-2's ``transformers.pytorch_utils.Conv1D`` computes; ``grad_weight`` is then (in, out).

    With no grad mode, or a weight that needs no gradient, this is ``F.linear`` and nothing is sampled.
    """
    if kept is None:
        check_budget(budget)
        check_method(method)
        check_floor(floor)
    if not (torch.is_grad_enabled() and weight.requires_grad) or (kept is None and budget >= 1.0):
        return exact_linear(x, weight, bias, transposed)
    _check_input(x)
    in_features = weight.shape[0] if transposed else weight.shape[-1]
    if weight.dim() != 2 or x.shape[-1] != in_features:
        raise ValueError(
            f"x has {x.shape[-1]} features but the weight of shape {tuple(weight.shape)} expects {in_features}"
            + (" (transposed: (in, out))" if transposed else " ((out, in))")
        )
    x = _as(x, compute_dtype(x))
    if kept is None:
        kept = keep_rows(x, budget, method, row_scores, generator, min_rows, floor)
    elif kept.num_rows != math.prod(x.shape[:-1]) or kept.rows.shape[-1] != in_features:
        raise ValueError(
            f"kept rows were sampled from an input of {kept.num_rows} rows x {kept.rows.shape[-1]} features; "
            f"this x has {math.prod(x.shape[:-1])} x {x.shape[-1]}"
        )
    return apply_sampled_linear(x, weight, bias, kept, transposed)
