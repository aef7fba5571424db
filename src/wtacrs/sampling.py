"""Column-row sampling: which rows of a product to keep, and how to rescale them.

An estimator of ``A.T @ B = sum_i outer(a_i, b_i)`` keeps a few rows ``i`` with scales ``w_i`` and returns
``sum_kept w_i * outer(a_i, b_i)``. Every method here except ``"topk"`` is unbiased: the expected value of
the estimate equals the exact product, for any probabilities that are positive wherever a row's term is
non-zero.

Methods (see ``sample_rows``):

* ``"wta_crs"``: the ``c`` most probable rows are kept exactly (scale 1), ``c`` chosen to minimise
  ``(1 - P_c) / (k - c)``; the other ``k - c`` draws are i.i.d. with replacement from the remaining rows
  with ``q_j = p_j / (1 - P_c)`` and scale ``1 / ((k - c) q_j)``.
* ``"crs"``: ``k`` i.i.d. draws with replacement from ``p``, scale ``1 / (k p_j)``.
* ``"uniform"``: ``"crs"`` with uniform ``p``.
* ``"topk"``: the ``k`` most probable rows with scale 1. Deterministic and biased; for ablations only.

Duplicate draws are merged into one kept row whose scale is the sum, so at most ``k`` rows are kept.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

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


def check_probs(probs: Tensor, n: int) -> None:
    """Shape and dtype checks that need no device sync; values are checked in ``sample_rows``."""
    if not isinstance(probs, Tensor):
        raise ValueError(f"probs must be a tensor of shape ({n},); got {type(probs).__name__}")
    if probs.shape != (n,):
        raise ValueError(f"probs must have shape ({n},), one entry per row; got {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise ValueError(f"probs must be a floating-point tensor; got {probs.dtype}")


def sample_rows(
    probs: Tensor,
    k: int,
    method: Method = "wta_crs",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Choose rows to keep and their scales.

    Args:
        probs: (N,) non-negative row weights; they need not sum to 1. A row whose weight is 0 is never
            kept, so the estimate is unbiased only if such rows contribute nothing to the product.
        k: the row budget; ``k >= N`` keeps every row with scale 1 (exact).
        method: one of ``METHODS``.
        generator: optional ``torch.Generator`` on ``probs``' device, for reproducible draws.

    Returns:
        ``(indices, scales)``: sorted, distinct int64 row indices (at most ``k``) and float32 scales, so that
        ``sum_t scales[t] * outer(a[indices[t]], b[indices[t]])`` estimates ``a.T @ b``.
    """
    indices, scales = draw_rows(probs, k, method, generator)
    if scales is None:
        raise ValueError(f"probs must be finite and >= 0; got {_bad_values(probs.detach().float())}")
    return indices, scales


def draw_rows(
    probs: Tensor, k: int, method: Method = "wta_crs", generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor | None]:
    """``sample_rows`` that reports NaN, Inf or negative ``probs`` by returning ``scales=None``, so that
    callers can word the error for where the probabilities came from."""
    check_method(method)
    if not isinstance(probs, Tensor) or probs.dim() != 1:
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"probs must be a 1-D tensor with one weight per row; got {shape}")
    n = probs.shape[0]
    check_probs(probs, n)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (rows to keep) must be an integer >= 1; got {k!r}")
    p = probs.detach().float()
    invalid = ~torch.isfinite(p).all() | (p < 0).any()
    device = probs.device
    if k >= n:
        if bool(invalid):
            return torch.arange(n, device=device), None
        return torch.arange(n, device=device), torch.ones(n, device=device, dtype=torch.float32)

    p = torch.where(torch.isfinite(p) & (p > 0), p, torch.zeros_like(p))
    if method == "uniform":
        p = torch.ones_like(p)
    total = p.sum()
    # All-zero weights: every term of the product is zero, any rows give the exact (zero) answer.
    p = torch.where(total > 0, p / total.clamp_min(torch.finfo(torch.float32).tiny), torch.full_like(p, 1.0 / n))

    if method == "topk":
        indices = torch.topk(p, k, sorted=False).indices
        scales = torch.ones(k, device=device, dtype=torch.float32)
    else:
        indices, scales = _winners_and_draws(p, k, wta=(method == "wta_crs"), generator=generator)
    return _merge_duplicates(indices, scales, invalid)


def _bad_values(t: Tensor) -> str:
    """A short description of the NaN, Inf and negative entries of ``t``, for error messages."""
    counts = {
        "NaN": int(torch.isnan(t).sum()),
        "Inf": int(torch.isinf(t).sum()),
        "negative": int((t < 0).sum()),
    }
    return ", ".join(f"{v} {name}" for name, v in counts.items() if v) + f" of {t.numel()} entries"


def _merge_duplicates(indices: Tensor, scales: Tensor, invalid: Tensor) -> tuple[Tensor, Tensor | None]:
    """Sorted distinct indices with summed scales; ``(indices, None)`` when ``invalid`` (a 0-d bool tensor).

    ``torch.unique`` is the one host sync of a sampled call. ``invalid`` rides along with it: it turns every
    index into -1, so a single distinct index is the only case where a value has to be read back.
    """
    indices = torch.where(invalid, torch.full_like(indices, -1), indices)
    indices, inverse = torch.unique(indices, sorted=True, return_inverse=True)  # host sync
    if indices.shape[0] == 1 and int(indices[0]) < 0:
        return indices, None
    merged = torch.zeros(indices.shape[0], device=indices.device, dtype=torch.float32)
    return indices, merged.index_add_(0, inverse, scales)


def _winners_and_draws(
    p: Tensor, k: int, wta: bool, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """k slots: the first c hold the winners (scale 1), the rest i.i.d. draws from the remaining mass.

    Written without host syncs: ``c`` stays a tensor, and each slot picks winner or draw with ``where``.
    """
    top_p, top_idx = torch.topk(p, k, sorted=True)  # descending
    slots = torch.arange(k, device=p.device)
    if wta:
        # rest[c] = mass outside the c largest rows, c = 0..k-1 (rest[0] = 1: plain CRS).
        rest = (1.0 - torch.cumsum(top_p, 0) + top_p).clamp_min(0.0)
        c = torch.argmin(rest / (k - slots).float())  # first minimiser
        is_winner = slots < c
    else:
        is_winner = torch.zeros(k, dtype=torch.bool, device=p.device)
    draws_per_slot = (k - is_winner.sum()).float()  # s = k - c

    # Remove the winners from the sampling distribution.
    rest_p = p.scatter(0, top_idx, torch.where(is_winner, torch.zeros_like(top_p), top_p))
    # Winners holding (almost) all the mass leave nothing to draw: those slots get scale 0 on a winner row.
    rest_mass = rest_p.sum()
    has_rest = rest_mass > 0
    drawn = torch.multinomial(torch.where(has_rest, rest_p, p), k, replacement=True, generator=generator)
    drawn_p = p[drawn]
    draw_scale = torch.where(has_rest, rest_mass / (draws_per_slot * drawn_p), torch.zeros_like(drawn_p))
    drawn = torch.where(has_rest, drawn, top_idx[0])

    indices = torch.where(is_winner, top_idx, drawn)
    scales = torch.where(is_winner, torch.ones_like(draw_scale), draw_scale)
    return indices, scales


def approx_matmul(
    a: Tensor,
    b: Tensor,
    k: int,
    method: Method = "wta_crs",
    probs: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Estimate ``a.T @ b`` for ``a`` (N, m) and ``b`` (N, n) from at most ``k`` sampled rows.

    ``probs`` defaults to ``||a_i|| * ||b_i||``, the variance-minimising choice for CRS. The exact plain-PyTorch
    value is ``a.T @ b``; for ``method != "topk"`` the mean of many estimates converges to it.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"a and b must be 2-D with the same number of rows; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    given = probs is not None
    if given:
        check_probs(probs, a.shape[0])
    else:
        probs = torch.linalg.vector_norm(a.float(), dim=1) * torch.linalg.vector_norm(b.float(), dim=1)
    indices, scales = draw_rows(probs, k, method, generator)
    if scales is None:
        if given:
            raise ValueError(f"probs must be finite and >= 0; got {_bad_values(probs.detach().float())}")
        raise ValueError("a and b must be finite: their row norms (the default probs) hold NaN or Inf")
    out_dtype = torch.result_type(a, b)
    # Scales can exceed fp16's range (rows with small p) and lose digits in bf16: rescale in fp32.
    dtype = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    kept_a = a.index_select(0, indices).to(dtype) * scales.to(dtype).unsqueeze(1)
    return (kept_a.T @ b.index_select(0, indices).to(dtype)).to(out_dtype)
