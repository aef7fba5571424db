"""The fold of a backward's per-token gradient norms into the running table of ``wtacrs.gradstats``."""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import use_triton


def fold_token_stats(table: Tensor, grad: Tensor, decay: float, floor: float) -> tuple[Tensor, Tensor]:
    """``(table, scores)`` after folding ``grad`` (V, 2) = per-token (sums, counts) into ``table`` (V,) (NaN: not
    seen yet): a token with rows gets the moving average of its mean ``sums / counts`` (the mean itself when not
    seen before), unless that mean is not finite; ``scores`` is the table with unseen tokens at the mean over seen
    ones (1 when that is not positive) and every entry at least ``floor`` times that mean."""
    if use_triton(table, grad):
        from .stats_triton import fold_token_stats_triton

        return fold_token_stats_triton(table, grad, decay, floor)
    return fold_token_stats_reference(table, grad, decay, floor)


def fold_token_stats_reference(table: Tensor, grad: Tensor, decay: float, floor: float) -> tuple[Tensor, Tensor]:
    sums, counts = grad.unbind(1)
    step_mean = sums / counts.clamp_min(1.0)
    updated = torch.where(table.isnan(), step_mean, decay * table + (1 - decay) * step_mean)
    table = torch.where((counts > 0) & step_mean.isfinite(), updated, table)
    seen = ~table.isnan()
    mean = torch.where(seen, table, 0.0).sum() / seen.sum().clamp_min(1)
    mean = torch.where(mean > 0, mean, 1.0)
    return table, torch.where(seen, table, mean).clamp_min(mean * floor)
