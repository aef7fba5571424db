"""The sampled linear op: exact forward, only the sampled rows of the input kept for backward.

``y = F.linear(x, W, b)`` is computed exactly. Backward needs ``x`` only for ``grad_W = grad_y.T @ x``;
that sum over rows is replaced by an unbiased estimate from the rows chosen by ``wtacrs.sampling``. So the
op saves ``x[kept]`` (x's dtype), the kept indices (int32 when they fit) and float32 scales, and nothing of
x's full size. ``grad_x`` and ``grad_b`` are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .sampling import DEFAULT_MIN_ROWS, Method, check_budget, check_method, check_probs, num_kept_rows, sample_rows

#: Share of the row probabilities taken from activation norms when the caller gives row scores, so that every
#: row whose input is non-zero keeps p > 0 (unbiasedness needs it even when a score is stale or zero).
DEFAULT_FLOOR = 0.1


@dataclass(frozen=True)
class KeptRows:
    """Rows of a layer input kept for the weight gradient.

    ``indices is None`` means every row is kept with scale 1 (``rows`` is then the whole input, not a copy).
    """

    rows: Tensor  # (m, d_in), the input's dtype
    indices: Tensor | None  # (m,) int32 (int64 for inputs of 2**31 rows or more)
    scales: Tensor | None  # (m,) float32
    num_rows: int  # N, the input's row count

    @property
    def saved_tensors(self) -> tuple[Tensor, ...]:
        return tuple(t for t in (self.rows, self.indices, self.scales) if t is not None)


def row_probabilities(x2d: Tensor, row_scores: Tensor | None = None, floor: float = DEFAULT_FLOOR) -> Tensor:
    """Row weights for sampling the rows of ``x2d`` (N, d): ``||x_i||``, or, given row scores (for example
    cached gradient norms), ``(1 - floor) * s_i / sum(s) + floor * ||x_i|| / sum(||x||)`` (times ``||x_i||``'s
    support, since a zero row adds nothing to the gradient)."""
    norms = torch.linalg.vector_norm(x2d.detach().float(), dim=1)
    if row_scores is None:
        return norms
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"floor must be in (0, 1] so that every non-zero row can be drawn; got {floor}")
    scores = row_scores.detach().reshape(-1).float()
    check_probs(scores, x2d.shape[0])
    tiny = torch.finfo(torch.float32).tiny
    mixed = (1.0 - floor) * scores / scores.sum().clamp_min(tiny) + floor * norms / norms.sum().clamp_min(tiny)
    return torch.where(norms > 0, mixed, torch.zeros_like(mixed))


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
    unbiased and the rows are stored once.
    """
    check_budget(budget)
    check_method(method)
    x2d = x.detach().reshape(-1, x.shape[-1])
    n = x2d.shape[0]
    k = num_kept_rows(n, budget, min_rows)
    if k >= n:
        return KeptRows(x.detach(), None, None, n)
    indices, scales = sample_rows(row_probabilities(x2d, row_scores, floor), k, method, generator)
    if n < 2**31:
        indices = indices.to(torch.int32)
    return KeptRows(x2d.index_select(0, indices), indices, scales, n)


class SampledLinearFunction(torch.autograd.Function):
    """``F.linear`` whose weight gradient is estimated from ``KeptRows``; see ``sampled_linear``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, kept: KeptRows) -> Tensor:
        ctx.x_shape = x.shape
        ctx.has_indices = kept.indices is not None
        ctx.save_for_backward(weight, *kept.saved_tensors)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weight, rows, *sample = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_2d @ weight.to(grad_2d.dtype)).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            rows2d = rows.reshape(-1, rows.shape[-1])
            if not ctx.has_indices:
                grad_w = grad_2d.T @ rows2d.to(grad_2d.dtype)
            else:
                indices, scales = sample
                kept_grad = grad_2d.index_select(0, indices)
                # Scales can be large (rows with small p); fp16 would overflow, bf16 and fp32 have the range.
                dtype = torch.float32 if kept_grad.dtype == torch.float16 else kept_grad.dtype
                kept_grad = kept_grad.to(dtype) * scales.to(dtype).unsqueeze(1)
                grad_w = kept_grad.T @ rows2d.to(dtype)
            grad_w = grad_w.to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b, None


def _autocast_cast(x: Tensor, weight: Tensor, bias: Tensor | None):
    """Cast like ``F.linear`` does under autocast, so forward output and kept rows use the autocast dtype."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


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
) -> Tensor:
    """``F.linear(x, weight, bias)`` that saves only sampled rows of ``x`` for the weight gradient.

    Forward is bit-identical to ``F.linear``; ``grad_x`` and ``grad_bias`` are exact; ``grad_weight`` is an
    unbiased estimate of ``grad_y.T @ x`` (plain PyTorch) from ``k = clamp(ceil(budget * N), min_rows, N)`` rows,
    N = the number of rows of ``x`` (all leading dims flattened).

    Args:
        x: (..., in_features).
        budget: fraction of rows kept, in (0, 1]; 1.0 is exactly ``F.linear``.
        method: ``"wta_crs"`` (default), ``"crs"``, ``"uniform"`` or ``"topk"`` (biased; ablation only).
        row_scores: optional per-row scores (shape ``x.shape[:-1]``), e.g. cached output-gradient norms; mixed
            with activation norms by ``floor`` so that every non-zero row keeps a positive probability.
        generator: optional ``torch.Generator`` for reproducible sampling.
        kept: rows already sampled from this same ``x`` (``keep_rows``), to share one sample among the layers
            that read ``x``; the sampling arguments are then unused.

    With no grad mode, or a weight that needs no gradient, this is ``F.linear`` and nothing is sampled.
    """
    if kept is None:
        check_budget(budget)
        check_method(method)
    if not (torch.is_grad_enabled() and weight.requires_grad) or (kept is None and budget >= 1.0):
        return F.linear(x, weight, bias)
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} features but the weight expects {weight.shape[-1]}")
    x, weight, bias = _autocast_cast(x, weight, bias)
    if kept is None:
        kept = keep_rows(x, budget, method, row_scores, generator, min_rows, floor)
    return SampledLinearFunction.apply(x, weight, bias, kept)
