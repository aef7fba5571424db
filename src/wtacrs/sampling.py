"""Column-row sampling: which rows of a product to keep, and how to rescale them.

An estimator of ``A.T @ B = sum_i outer(a_i, b_i)`` keeps ``k`` slots, each a row index ``i_t`` with a scale
``w_t``, and returns ``sum_t w_t * outer(a_{i_t}, b_{i_t})``. Every method here except ``"topk"`` is unbiased:
the expected value of the estimate equals the exact product, for any probabilities that are positive wherever
a row's term is non-zero.

Methods:

* ``"wta_crs"``: the ``c`` most probable rows are kept exactly (scale 1) in the first ``c`` slots, ``c`` chosen
  to minimise ``(1 - P_c) / (k - c)`` (``P_c``: the mass of the ``c`` largest); the other ``k - c`` slots are
  i.i.d. draws with replacement from the remaining rows with ``q_j = p_j / (1 - P_c)`` and scale
  ``1 / ((k - c) q_j)``.
* ``"crs"``: ``k`` i.i.d. draws with replacement from ``p``, scale ``1 / (k p_j)``.
* ``"uniform"``: ``"crs"`` with uniform ``p``.
* ``"topk"``: the ``k`` most probable rows with scale 1. Deterministic and biased; for ablations only.

Shapes are static: always ``k`` slots. A row drawn twice fills two slots (the sum is the same estimate), so
nothing depends on the values drawn and nothing is read back to the host: ``draw`` runs without a device sync.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from . import kernels

Method = Literal["wta_crs", "crs", "uniform", "topk"]
METHODS: tuple[str, ...] = ("wta_crs", "crs", "uniform", "topk")

#: The paper keeps at least 10 rows per layer and step.
DEFAULT_MIN_ROWS = 10


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")


def check_budget(budget: float) -> None:
    """Budget is the fraction of rows kept: a number in (0, 1]; 1.0 means exact."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be a number in (0, 1], the fraction of rows kept; got {budget!r}")
    if math.isnan(budget) or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], the fraction of rows kept (1.0 = exact); got {budget}")


def check_min_rows(min_rows: int) -> None:
    if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 1:
        raise ValueError(f"min_rows must be an integer >= 1; got {min_rows!r}")


def num_kept_rows(n: int, budget: float, min_rows: int = DEFAULT_MIN_ROWS) -> int:
    """``k = clamp(ceil(budget * n), min_rows, n)``: the row budget for ``n`` rows."""
    check_budget(budget)
    check_min_rows(min_rows)
    # The small epsilon keeps e.g. ceil(0.3 * 10) at 3 despite 0.3 * 10 == 3.0000000000000004.
    return max(0, min(n, max(min_rows, math.ceil(budget * n - 1e-9))))


def draw(
    p: Tensor, k: int, method: str = "wta_crs", generator: torch.Generator | None = None,
    counter: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``k`` slots for each row of weights ``p`` (..., N) with ``1 <= k < N``: (indices, scales), both (..., k).

    ``p`` holds float32 weights; they need not sum to 1. Non-finite weights make every scale of their row NaN (the
    estimate is then NaN, as the exact product of non-finite rows is), and the row is drawn with NaN and -Inf
    weights as the smallest positive float32 and +Inf as the largest; a row of all-zero weights has all-zero terms,
    so any slots give its exact (zero) answer. Indices are int64, scales float32. No host synchronisation, no
    data-dependent shape. ``counter`` (a 0-d float32 tensor, optional) gets the sum of ``p`` added, so that a
    non-finite weight leaves it non-finite (``wtacrs.health``).
    """
    indices, scales, _ = draw_rows(p, k, method, generator, counter)
    return indices, scales


def draw_rows(
    p: Tensor, k: int, method: str = "wta_crs", generator: torch.Generator | None = None,
    counter: Tensor | None = None, rows_of: Tensor | None = None, dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``draw``, and with ``rows_of`` (N, d) for weights ``p`` (N,) also the kept rows ``rows_of[indices]`` in
    ``dtype`` (gathered with the slots in one kernel where the Triton kernels run)."""
    if method == "wta_crs":
        return _winners_and_draws(p, k, generator, counter, rows_of, dtype)
    total = p.sum(-1, keepdim=True)
    if counter is not None:
        counter.add_(total.sum())
    p = _safe(p)
    if method == "uniform":
        drawn = _multinomial(torch.ones_like(p), k, generator)
        scales = torch.full(drawn.shape, p.shape[-1] / k, dtype=torch.float32, device=p.device)
    elif method == "topk":
        drawn = torch.topk(p, k, dim=-1, sorted=False).indices
        scales = torch.ones(drawn.shape, dtype=torch.float32, device=p.device)
    else:
        drawn = _multinomial(p, k, generator)
        scales = p.sum(-1, keepdim=True) / (k * p.gather(-1, drawn))
    scales = torch.where(total.isfinite(), scales, math.nan)
    if rows_of is None:
        return drawn, scales, None
    rows = rows_of.index_select(0, drawn)
    return drawn, scales, rows if dtype is None or rows.dtype == dtype else rows.to(dtype)


_TINY = torch.finfo(torch.float32).tiny
_MAX = torch.finfo(torch.float32).max


def _safe(p: Tensor) -> Tensor:
    """Every weight in [tiny, max] (NaN to tiny, Inf to max). Raising zero weights to tiny keeps the draws valid (a
    row of zeros is drawn uniformly) and biases nothing: a scale is always computed from the weight the row was
    drawn with, and rows of zero weight have zero terms."""
    return torch.nan_to_num(p, nan=_TINY, posinf=_MAX, neginf=_TINY).clamp_min_(_TINY)


def _winners_and_draws(p: Tensor, k: int, generator: torch.Generator | None, counter: Tensor | None,
                       rows_of: Tensor | None, dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """WTA-CRS: the first ``c`` slots hold the winners (scale 1), the others draws (``wtacrs.kernels.draws``)."""
    safe = _safe(p)
    top_p, top_idx = torch.topk(safe, k, dim=-1, sorted=True)  # descending
    rest_p, stats = kernels.wta_crs_rest(p, safe, top_p, top_idx, counter)
    drawn = _multinomial(rest_p, k, generator)
    return kernels.wta_crs_slots(safe, top_idx, drawn, stats, rows_of, dtype)


def _multinomial(p: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    # One draw takes ATen's sampling-without-replacement path, which checks the weights on the host: draw two.
    n = max(k, 2)
    if p.dim() <= 2:
        drawn = torch.multinomial(p, n, replacement=True, generator=generator)
    else:
        flat = p.reshape(-1, p.shape[-1])
        drawn = torch.multinomial(flat, n, replacement=True, generator=generator).reshape(*p.shape[:-1], n)
    return drawn if n == k else drawn[..., :k]


def sample_rows(
    probs: Tensor,
    k: int,
    method: Method = "wta_crs",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Choose ``k`` slots (row index and scale) from row weights ``probs`` (N,), or for each row of (G, N).

    Args:
        probs: non-negative, finite row weights; they need not sum to 1. A row whose weight is 0 is never kept,
            so the estimate is unbiased only if such rows contribute nothing to the product.
        k: the number of slots; ``k >= N`` keeps every row once with scale 1 (exact).
        method: one of ``METHODS``.
        generator: optional ``torch.Generator`` on ``probs``' device, for reproducible draws.

    Returns:
        ``(indices, scales)`` of shape (..., min(k, N)): int64 row indices (a row may fill several slots) and
        float32 scales, so that ``sum_t scales[t] * outer(a[indices[t]], b[indices[t]])`` estimates ``a.T @ b``.

    The values of ``probs`` are checked on the host (one device sync); the training path (``sampled_linear``)
    checks them without one.
    """
    check_method(method)
    if not isinstance(probs, Tensor) or probs.dim() not in (1, 2) or not probs.is_floating_point():
        what = f"{probs.dtype} tensor of shape {tuple(probs.shape)}" if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"probs must be a floating-point tensor of shape (N,) or (G, N); got {what}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (rows to keep) must be an integer >= 1; got {k!r}")
    p = probs.detach().float()
    if not bool(torch.isfinite(p).all() & (p >= 0).all()):
        raise ValueError(f"probs must be finite and >= 0; got {describe_bad_values(p)}")
    n = p.shape[-1]
    if k >= n:
        indices = torch.arange(n, device=p.device).expand(*p.shape[:-1], n)
        return indices, torch.ones(indices.shape, dtype=torch.float32, device=p.device)
    return draw(p, k, method, generator)


def describe_bad_values(t: Tensor) -> str:
    """A short description of the NaN, Inf and negative entries of ``t``, for error messages (reads ``t``)."""
    counts = {"NaN": int(torch.isnan(t).sum()), "Inf": int(torch.isinf(t).sum()), "negative": int((t < 0).sum())}
    return ", ".join(f"{v} {name}" for name, v in counts.items() if v) + f" of {t.numel()} entries"


def approx_matmul(
    a: Tensor,
    b: Tensor,
    k: int,
    method: Method = "wta_crs",
    probs: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Estimate ``a.T @ b`` for ``a`` (N, m) and ``b`` (N, n) from ``k`` sampled rows.

    ``probs`` defaults to ``||a_i|| * ||b_i||``, the variance-minimising choice for CRS. The exact plain-PyTorch
    value is ``a.T @ b``; for ``method != "topk"`` the mean of many estimates converges to it.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"a and b must be 2-D with the same number of rows; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if probs is None:
        probs = torch.linalg.vector_norm(a.float(), dim=1) * torch.linalg.vector_norm(b.float(), dim=1)
        if not bool(torch.isfinite(probs).all()):
            raise ValueError("a and b must be finite: their row norms (the default probs) hold NaN or Inf")
    elif not isinstance(probs, Tensor) or probs.shape != (a.shape[0],):
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"probs must have shape ({a.shape[0]},), one weight per row; got {shape}")
    indices, scales = sample_rows(probs, k, method, generator)
    out_dtype = torch.result_type(a, b)
    # Scales can exceed fp16's range (rows with small p) and lose digits in bf16: rescale in fp32.
    dtype = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    kept_a = a.index_select(0, indices).to(dtype) * scales.to(dtype).unsqueeze(1)
    return (kept_a.T @ b.index_select(0, indices).to(dtype)).to(out_dtype)
