"""Triton version of the token-statistics fold (``stats.py`` holds the reference): one program, two passes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 1024


@triton.jit
def _fold_kernel(table, grad, new_table, scores, v, decay, floor, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    seen_sum = tl.zeros([BLOCK], dtype=tl.float32)
    seen_count = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, v, BLOCK):
        i = start + offsets
        ok = i < v
        old = tl.load(table + i, mask=ok, other=0.0)
        sums = tl.load(grad + 2 * i, mask=ok, other=0.0)
        counts = tl.load(grad + 2 * i + 1, mask=ok, other=0.0)
        step_mean = sums / tl.maximum(counts, 1.0)
        updated = tl.where(old != old, step_mean, decay * old + (1 - decay) * step_mean)
        new = tl.where((counts > 0) & (step_mean - step_mean == 0.0), updated, old)
        tl.store(new_table + i, new, mask=ok)
        seen = ok & (new == new)
        seen_sum += tl.where(seen, new, 0.0)
        seen_count += seen.to(tl.float32)
    mean = tl.sum(seen_sum, axis=0) / tl.maximum(tl.sum(seen_count, axis=0), 1.0)
    mean = tl.where(mean > 0, mean, 1.0)
    tl.debug_barrier()  # the new table is written before it is read back
    for start in range(0, v, BLOCK):
        i = start + offsets
        ok = i < v
        new = tl.load(new_table + i, mask=ok, other=0.0)
        tl.store(scores + i, tl.maximum(tl.where(new == new, new, mean), mean * floor), mask=ok)


def fold_token_stats_triton(table: Tensor, grad: Tensor, decay: float, floor: float) -> tuple[Tensor, Tensor]:
    grad = grad if grad.is_contiguous() else grad.contiguous()
    new_table, scores = torch.empty_like(table), torch.empty_like(table)
    v = table.shape[0]
    _fold_kernel[(1,)](table, grad, new_table, scores, v, float(decay), float(floor),
                       BLOCK=min(_BLOCK, triton.next_power_of_2(v)))
    return new_table, scores
