"""The sampled linear op: exact forward, only the sampled rows of the input kept for backward.

``y = F.linear(x, W, b)`` is computed exactly. Backward needs ``x`` only for ``grad_W = grad_y.T @ x``;
that sum over rows is replaced by an unbiased estimate from the rows chosen by ``wtacrs.sampling``. So the
op saves ``x[kept]`` (x's dtype, or the autocast dtype), the kept indices (int32 when they fit) and float32
scales, and nothing of x's full size. ``grad_x`` and ``grad_b`` are exact.

GPT-2-style ``Conv1D`` layers (weight of shape (in, out), ``y = addmm(b, x, W)``) are served by the same op
with ``transposed=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .sampling import DEFAULT_MIN_ROWS, Method, check_budget, check_method, draw_rows, num_kept_rows

#: Share of the row probabilities taken from activation norms when the caller gives row scores, so that every
#: row whose input is non-zero keeps p > 0 (unbiasedness needs it even when a score is stale or zero).
DEFAULT_FLOOR = 0.1

_INDEX_INT32_LIMIT = 2**31

#: Autograd nodes that save their own output for backward. A layer reading such an output keeps all of it at no
#: extra cost (the same storage is already held), so it takes the exact gradient instead of a sample.
_OUTPUT_SAVING_NODES = frozenset({"ReluBackward0", "SoftmaxBackward0", "TanhBackward0", "SigmoidBackward0"})


@dataclass(frozen=True)
class KeptRows:
    """Rows of a layer input kept for the weight gradient.

    ``indices is None`` means every row is kept with scale 1 (``rows`` is then the whole input, not a copy,
    unless autocast changed its dtype).
    """

    rows: Tensor  # (m, d_in), the input's dtype (the autocast dtype under autocast)
    indices: Tensor | None  # (m,) int32 (int64 for inputs of 2**31 rows or more)
    scales: Tensor | None  # (m,) float32
    num_rows: int  # N, the input's row count
    already_saved_by: str | None = None  # the autograd node that saves the whole input anyway, if any

    @property
    def saved_tensors(self) -> tuple[Tensor, ...]:
        return tuple(t for t in (self.rows, self.indices, self.scales) if t is not None)


def check_floor(floor: float) -> None:
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or math.isnan(floor) or not 0.0 < floor <= 1.0:
        raise ValueError(
            f"floor must be in (0, 1], the share of p taken from activation norms so that every non-zero row "
            f"can be drawn; got {floor!r}"
        )


def row_probabilities(x2d: Tensor, row_scores: Tensor | None = None, floor: float = DEFAULT_FLOOR) -> Tensor:
    """Row weights for sampling the rows of ``x2d`` (N, d).

    Without scores: ``||x_i||``. With row scores ``s_i``, estimates of the output-gradient norms ``||dy_i||`` (for
    example from a ``GradNormCache``): ``(1 - floor) * u_i / sum(u) + floor * ||x_i|| / sum(||x||)`` with
    ``u_i = ||x_i|| * s_i``, the variance-minimising weight, mixed with activation norms so that every non-zero
    row keeps p > 0 even where a score is stale or zero.

    A NaN, Inf or negative score makes that row's weight NaN, so that sampling reports it.
    """
    norms = torch.linalg.vector_norm(x2d.detach().float(), dim=1)
    if row_scores is None:
        return norms
    check_floor(floor)
    scores = row_scores.detach().reshape(-1).float()
    if scores.shape[0] != x2d.shape[0]:
        raise ValueError(f"row_scores must hold one score per row of x ({x2d.shape[0]}); got {scores.shape[0]}")
    bad = ~torch.isfinite(scores) | (scores < 0)
    scores = torch.where(bad, torch.zeros_like(scores), scores)
    tiny = torch.finfo(torch.float32).tiny
    weighted = norms * scores
    mixed = (1.0 - floor) * weighted / weighted.sum().clamp_min(tiny) + floor * norms / norms.sum().clamp_min(tiny)
    mixed = torch.where(norms > 0, mixed, torch.zeros_like(mixed))
    return torch.where(bad, torch.full_like(mixed, math.nan), mixed)


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


def _check_row_scores(row_scores: Tensor, x: Tensor) -> None:
    if not isinstance(row_scores, Tensor) or not row_scores.is_floating_point():
        what = row_scores.dtype if isinstance(row_scores, Tensor) else type(row_scores).__name__
        raise ValueError(f"row_scores must be a floating-point tensor; got {what}")
    rows = x.shape[:-1]
    if row_scores.shape not in (rows, (math.prod(rows),)):
        raise ValueError(
            f"row_scores must have shape {tuple(rows)} (x's shape without its last dim) or ({math.prod(rows)},); "
            f"got {tuple(row_scores.shape)}"
        )


def keep_rows(
    x: Tensor,
    budget: float,
    method: Method = "wta_crs",
    row_scores: Tensor | None = None,
    generator: torch.Generator | None = None,
    min_rows: int = DEFAULT_MIN_ROWS,
    floor: float = DEFAULT_FLOOR,
    row_mask: Tensor | None = None,
) -> KeptRows:
    """Sample the rows of ``x`` (..., d_in) to keep for the weight gradient of a linear layer reading ``x``.

    ``row_mask`` (shape ``x.shape[:-1]``, bool) marks the rows that may be kept; rows outside it get probability 0,
    which keeps the estimate unbiased only if their output gradient is zero (padding tokens).

    One ``KeptRows`` may serve several layers that read the same ``x``: each layer's gradient estimate stays
    unbiased and the rows are stored once. Under autocast the rows are stored in the autocast dtype, the
    dtype the layers compute in.

    Nothing is stored twice: if ``x`` is the output of an op that saves its output anyway (ReLU, softmax, tanh,
    sigmoid), all of ``x`` is kept by reference and the gradient is exact.
    """
    check_budget(budget)
    check_method(method)
    check_floor(floor)
    _check_input(x)
    if row_scores is not None:
        _check_row_scores(row_scores, x)
    x2d = x.detach().reshape(-1, x.shape[-1])
    n = x2d.shape[0]
    k = num_kept_rows(n, budget, min_rows)
    dtype = compute_dtype(x)
    if k >= n:
        return KeptRows(x.detach().to(dtype), None, None, n)
    producer = type(x.grad_fn).__name__ if x.grad_fn is not None and x._base is None else None
    if producer in _OUTPUT_SAVING_NODES and dtype == x.dtype:
        return KeptRows(x.detach(), None, None, n, already_saved_by=producer)
    probs = row_probabilities(x2d, row_scores, floor)
    if row_mask is not None:
        if row_mask.shape != x.shape[:-1]:
            raise ValueError(f"row_mask must have shape {tuple(x.shape[:-1])}; got {tuple(row_mask.shape)}")
        probs = probs * row_mask.reshape(-1).to(probs.dtype)
    indices, scales = draw_rows(probs, k, method, generator)
    if scales is None:
        if not torch.isfinite(x2d).all():
            raise ValueError(
                "x (the layer input) contains NaN or Inf, so its rows cannot be sampled: "
                "check the model's forward for overflow"
            )
        raise ValueError("row_scores must be finite and >= 0; got NaN, Inf or negative entries")
    if n < _INDEX_INT32_LIMIT:
        indices = indices.to(torch.int32)
    return KeptRows(x2d.index_select(0, indices).to(dtype), indices, scales, n)


def exact_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, transposed: bool = False) -> Tensor:
    """``F.linear``, or with ``transposed`` exactly what ``transformers``' ``Conv1D`` computes."""
    if not transposed:
        return F.linear(x, weight, bias)
    x2d = x.reshape(-1, x.shape[-1])
    out = x2d @ weight if bias is None else torch.addmm(bias, x2d, weight)
    return out.view(*x.shape[:-1], weight.shape[-1])


class SampledLinearFunction(torch.autograd.Function):
    """``F.linear`` whose weight gradient is estimated from ``KeptRows``; see ``sampled_linear``.

    With ``transposed=True`` the weight is (in, out) and the forward is ``Conv1D``'s ``addmm``.
    The weight is saved as given (a parameter, no copy) and cast to the gradient's dtype in backward, so under
    autocast no low-precision weight copy is kept for backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, kept: KeptRows, transposed: bool = False):
        ctx.x_shape = x.shape
        ctx.has_indices = kept.indices is not None
        ctx.transposed = transposed
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(weight, *kept.saved_tensors)
        return exact_linear(x, weight, bias, transposed)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weight, rows, *sample = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        dtype = grad_2d.dtype
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w = weight.to(dtype)
            grad_x = (grad_2d @ (w.T if ctx.transposed else w)).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            rows2d = rows.reshape(-1, rows.shape[-1])
            if not ctx.has_indices:
                kept_grad = grad_2d
            else:
                indices, scales = sample
                # Scales can be large (rows with small p): rescale in fp32. fp16 would overflow, so it stays
                # fp32; bf16 has fp32's range and goes back to bf16 for the matmul.
                kept_grad = grad_2d.index_select(0, indices)
                if dtype in (torch.float16, torch.bfloat16):
                    kept_grad = kept_grad.float() * scales.unsqueeze(1)
                    if dtype == torch.bfloat16:
                        kept_grad = kept_grad.to(dtype)
                else:
                    kept_grad = kept_grad * scales.to(dtype).unsqueeze(1)
            rows2d = rows2d.to(kept_grad.dtype)
            grad_w = rows2d.T @ kept_grad if ctx.transposed else kept_grad.T @ rows2d
            grad_w = grad_w.to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


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
    unbiased estimate of ``grad_y.T @ x`` (plain PyTorch) from ``k = clamp(ceil(budget * N), min_rows, N)`` rows,
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
    x = x.to(compute_dtype(x))
    if kept is None:
        kept = keep_rows(x, budget, method, row_scores, generator, min_rows, floor)
    elif kept.num_rows != math.prod(x.shape[:-1]) or kept.rows.shape[-1] != in_features:
        raise ValueError(
            f"kept rows were sampled from an input of {kept.num_rows} rows x {kept.rows.shape[-1]} features; "
            f"this x has {math.prod(x.shape[:-1])} x {x.shape[-1]}"
        )
    return SampledLinearFunction.apply(x, weight, bias, kept, transposed)
