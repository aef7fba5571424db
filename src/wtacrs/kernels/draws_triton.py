"""Triton versions of the WTA-CRS draw steps (``draws.py`` holds the references and says what they compute).

``wta_crs_rest`` runs one program per row of weights (the sums, the winner count and the zeroing of the winners
need the whole row); ``wta_crs_slots`` one program per block of slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .convert_triton import store_as

_BLOCK = 1024


@triton.jit
def _rest_kernel(p, safe, top_p, top_idx, rest_p, stats, counter, n, k,
                 HAS_COUNTER: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    p_row, safe_row, rest_row = p + g * n, safe + g * n, rest_p + g * n
    top_row, idx_row = top_p + g * k, top_idx + g * k
    offsets = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    total_safe = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        i = start + offsets
        ok = i < n
        total += tl.load(p_row + i, mask=ok, other=0.0)
        v = tl.load(safe_row + i, mask=ok, other=0.0)
        total_safe += v
        tl.store(rest_row + i, v, mask=ok)
    raw_sum = tl.sum(total, axis=0)
    safe_sum = tl.sum(total_safe, axis=0)
    if HAS_COUNTER:
        tl.atomic_add(counter, raw_sum)
    # c = the first minimiser of rest_c / (k - c), rest_c = (sum - cumsum(top_p)[c]) + top_p[c], c = 0..k-1.
    best = tl.full([], float("inf"), tl.float32)  # loop-carried scalars, typed as the loop makes them
    c = tl.full([], 0, tl.int32)
    carried = tl.full([], 0.0, tl.float32)
    for start in range(0, k, BLOCK):
        j = start + offsets
        ok = j < k
        top = tl.load(top_row + j, mask=ok, other=0.0)
        cumulative = tl.cumsum(top, axis=0) + carried
        rest = tl.math.div_rn((safe_sum - cumulative) + top, (k - j).to(tl.float32))
        rest = tl.where(ok, rest, float("inf"))
        block_best = tl.min(rest, axis=0)
        block_c = (tl.argmin(rest, axis=0) + start).to(tl.int32)
        c = tl.where(block_best < best, block_c, c)
        best = tl.minimum(block_best, best)
        carried += tl.sum(top, axis=0)
    tl.debug_barrier()  # every copy into rest_row is done before the winners are zeroed
    for start in range(0, k, BLOCK):
        j = start + offsets
        winner = j < c
        tl.store(rest_row + tl.load(idx_row + j, mask=winner, other=0), 0.0, mask=winner)
    tl.debug_barrier()
    mass = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        i = start + offsets
        mass += tl.load(rest_row + i, mask=i < n, other=0.0)
    finite = raw_sum - raw_sum == 0.0  # false for NaN and +-Inf
    tl.store(stats + g * 2, c.to(tl.float32))
    tl.store(stats + g * 2 + 1, tl.where(finite, tl.sum(mass, axis=0), float("nan")))


def wta_crs_rest_triton(p: Tensor, safe: Tensor, top_p: Tensor, top_idx: Tensor,
                        counter: Tensor | None) -> tuple[Tensor, Tensor]:
    p, safe, top_p, top_idx = (t.contiguous() for t in (p, safe, top_p, top_idx))
    n, k = p.shape[-1], top_p.shape[-1]
    rows = p.numel() // n
    rest_p = torch.empty(p.shape, dtype=torch.float32, device=p.device)
    stats = torch.empty(*p.shape[:-1], 2, dtype=torch.float32, device=p.device)
    _rest_kernel[(rows,)](p, safe, top_p, top_idx, rest_p, stats, stats if counter is None else counter, n, k,
                          HAS_COUNTER=counter is not None, BLOCK=min(_BLOCK, triton.next_power_of_2(max(n, k))))
    return rest_p, stats


@triton.jit
def _slots_kernel(safe, top_idx, drawn, stats, indices, scales, x, rows, n, k, d, stride_n, stride_d,
                  GATHER: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = t < k
    c = tl.load(stats + g * 2).to(tl.int32)
    mass = tl.load(stats + g * 2 + 1)
    winner = t < c
    index = tl.where(winner, tl.load(top_idx + g * k + t, mask=ok, other=0),
                     tl.load(drawn + g * k + t, mask=ok, other=0))
    weight = tl.load(safe + g * n + index, mask=ok & ~winner, other=1.0)
    scale = tl.math.div_rn(mass, (k - c).to(tl.float32) * weight)
    scale = tl.where(winner, tl.where(mass == mass, 1.0, float("nan")), scale)
    tl.store(indices + g * k + t, index, mask=ok)
    tl.store(scales + g * k + t, scale, mask=ok)
    if GATHER:
        for start in range(0, d, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            both = ok[:, None] & (cols < d)[None, :]
            v = tl.load(x + index[:, None] * stride_n + cols[None, :] * stride_d, mask=both, other=0.0)
            store_as(rows + t[:, None].to(tl.int64) * d + cols[None, :], v.to(tl.float32), both)


def wta_crs_slots_triton(safe: Tensor, top_idx: Tensor, drawn: Tensor, stats: Tensor, rows_of: Tensor | None,
                         dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor | None]:
    safe, top_idx, drawn = safe.contiguous(), top_idx.contiguous(), drawn.contiguous()
    n, k = safe.shape[-1], top_idx.shape[-1]
    groups = top_idx.numel() // k
    indices = torch.empty(top_idx.shape, dtype=torch.int64, device=safe.device)
    scales = torch.empty(top_idx.shape, dtype=torch.float32, device=safe.device)
    if rows_of is None:
        rows, d, strides, x = None, 0, (0, 0), indices
    else:
        rows = torch.empty(k, rows_of.shape[1], dtype=dtype or rows_of.dtype, device=rows_of.device)
        d, strides, x = rows_of.shape[1], rows_of.stride(), rows_of
    block_d = min(triton.next_power_of_2(max(d, 1)), 256)
    block_k = max(1, min(triton.next_power_of_2(k), 4096 // block_d if rows_of is not None else _BLOCK))
    _slots_kernel[(groups, triton.cdiv(k, block_k))](
        safe, top_idx, drawn, stats, indices, scales, x, indices if rows is None else rows, n, k, d, *strides,
        GATHER=rows_of is not None, BLOCK_K=block_k, BLOCK_D=block_d,
    )
    return indices, scales, rows
