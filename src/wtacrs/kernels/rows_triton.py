"""Triton versions of the row kernels (``rows.py`` holds the references and says when these run)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .convert_triton import store_as

#: Elements one program holds per step: rows x columns of a block.
_BLOCK_ELEMENTS = 4096


def _blocks(d: int) -> tuple[int, int]:
    """(rows, columns) of a block for rows of ``d`` elements."""
    block_d = min(triton.next_power_of_2(d), 1024)
    return max(1, _BLOCK_ELEMENTS // block_d), block_d


@triton.jit
def _row_norms_kernel(x, out, scores, ids, n, d, stride_n, stride_d, SCORED: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < d)[None, :]
        v = tl.load(x + rows[:, None].to(tl.int64) * stride_n + cols[None, :] * stride_d, mask=ok, other=0.0)
        v = v.to(tl.float32)
        acc += tl.sum(v * v, axis=1)
    norms = tl.sqrt_rn(acc)
    if SCORED:
        norms = norms * tl.load(scores + tl.load(ids + rows, mask=row_ok, other=0), mask=row_ok, other=0.0)
    tl.store(out + rows, norms, mask=row_ok)


def _row_norms(x2d: Tensor, scores: Tensor | None, ids: Tensor | None) -> Tensor:
    n, d = x2d.shape
    out = torch.empty(n, dtype=torch.float32, device=x2d.device)
    block_m, block_d = _blocks(d)
    scored = scores is not None
    _row_norms_kernel[(triton.cdiv(n, block_m),)](
        x2d, out, scores if scored else out, ids if scored else out, n, d, x2d.stride(0), x2d.stride(1),
        SCORED=scored, BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return out


def row_norms_triton(x2d: Tensor) -> Tensor:
    return _row_norms(x2d, None, None)


def row_weights_triton(x2d: Tensor, scores: Tensor, ids: Tensor) -> Tensor:
    return _row_norms(x2d, scores, ids)


@triton.jit
def _gather_scale_rows_kernel(g, indices, scales, out, k, d, stride_n, stride_d,
                              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    slots = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    slot_ok = slots < k
    ok = slot_ok[:, None] & (cols < d)[None, :]
    rows = tl.load(indices + slots, mask=slot_ok, other=0).to(tl.int64)
    scale = tl.load(scales + slots, mask=slot_ok, other=0.0)
    v = tl.load(g + rows[:, None] * stride_n + cols[None, :] * stride_d, mask=ok, other=0.0)
    store_as(out + slots[:, None].to(tl.int64) * d + cols[None, :], v.to(tl.float32) * scale[:, None], ok)


def gather_scale_rows_triton(g2d: Tensor, indices: Tensor, scales: Tensor) -> Tensor:
    n, d = g2d.shape
    k = indices.shape[0]
    out_dtype = torch.float32 if g2d.dtype == torch.float16 else g2d.dtype
    out = torch.empty(k, d, dtype=out_dtype, device=g2d.device)
    block_m, block_d = _blocks(d)
    grid = (triton.cdiv(k, block_m), triton.cdiv(d, block_d))
    _gather_scale_rows_kernel[grid](
        g2d, indices, scales, out, k, d, g2d.stride(0), g2d.stride(1), BLOCK_M=block_m, BLOCK_D=block_d
    )
    return out


@triton.jit
def _token_sums_kernel(norms, ids, out, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        total += tl.load(norms + start + offsets, mask=start + offsets < n, other=0.0)
    mean = tl.sum(total, axis=0) / n
    for start in range(0, n, BLOCK):
        i = start + offsets
        ok = i < n
        slot = tl.load(ids + i, mask=ok, other=0).to(tl.int64) * 2
        tl.atomic_add(out + slot, tl.load(norms + i, mask=ok, other=0.0) / mean, mask=ok)
        tl.atomic_add(out + slot + 1, tl.full([BLOCK], 1.0, tl.float32), mask=ok)


def token_norm_sums_triton(g2d: Tensor, ids: Tensor, vocab_size: int) -> Tensor:
    norms = row_norms_triton(g2d)
    out = torch.zeros(vocab_size, 2, dtype=torch.float32, device=g2d.device)
    n = norms.shape[0]
    _token_sums_kernel[(1,)](norms, ids, out, n, BLOCK=min(1024, triton.next_power_of_2(n)))
    return out
