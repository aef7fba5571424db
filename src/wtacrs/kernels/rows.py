"""Row kernels of the sampled linear: row norms of the input (forward) and the gather-and-scale of the kept rows of
the output gradient (backward)."""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import TRITON_FLOATS, use_triton


def row_norms(x2d: Tensor) -> Tensor:
    """``torch.linalg.vector_norm(x2d, dim=1, dtype=torch.float32)``: (N,) float32 norms of the rows of ``x2d``."""
    if x2d.dtype in TRITON_FLOATS and use_triton(x2d):
        from .rows_triton import row_norms_triton

        return row_norms_triton(x2d)
    return row_norms_reference(x2d)


def row_norms_reference(x2d: Tensor) -> Tensor:
    if x2d.dtype == torch.float64:  # vector_norm cannot narrow float64 through its dtype argument
        return torch.linalg.vector_norm(x2d, dim=1).float()
    return torch.linalg.vector_norm(x2d, dim=1, dtype=torch.float32)


def row_weights(x2d: Tensor, scores: Tensor, ids: Tensor) -> Tensor:
    """``row_norms(x2d) * scores[ids]``: (N,) float32 weights of the rows of ``x2d``, each row's norm times the score
    of its id (token statistics)."""
    if x2d.dtype in TRITON_FLOATS and use_triton(x2d, scores, ids):
        from .rows_triton import row_weights_triton

        return row_weights_triton(x2d, scores, ids)
    return row_weights_reference(x2d, scores, ids)


def row_weights_reference(x2d: Tensor, scores: Tensor, ids: Tensor) -> Tensor:
    return row_norms_reference(x2d) * scores[ids]


def token_norm_sums(g2d: Tensor, ids: Tensor, vocab_size: int) -> Tensor:
    """(vocab_size, 2) float32: per id v, the sum of ``||g_i|| / mean_j ||g_j||`` over the rows i of ``g2d`` with
    ``ids[i] == v``, and their count (``wtacrs.gradstats``)."""
    if g2d.dtype in TRITON_FLOATS and use_triton(g2d, ids):
        from .rows_triton import token_norm_sums_triton

        return token_norm_sums_triton(g2d, ids, vocab_size)
    return token_norm_sums_reference(g2d, ids, vocab_size)


def token_norm_sums_reference(g2d: Tensor, ids: Tensor, vocab_size: int) -> Tensor:
    norms = row_norms_reference(g2d)
    per_row = torch.stack((norms / norms.mean(), torch.ones_like(norms)), 1)
    return per_row.new_zeros(vocab_size, 2).index_add_(0, ids, per_row)


def gather_scale_rows(g2d: Tensor, indices: Tensor, scales: Tensor) -> Tensor:
    """``g2d[indices] * scales[:, None]``: the kept rows of an output gradient, each times its slot's scale.

    Computed in float32; the result is ``g2d``'s dtype, except float16, which stays float32 (a scale can exceed
    float16's range: rows drawn with a small probability get a large one).
    """
    if g2d.dtype in TRITON_FLOATS and use_triton(g2d, indices, scales):
        from .rows_triton import gather_scale_rows_triton

        return gather_scale_rows_triton(g2d, indices, scales)
    return gather_scale_rows_reference(g2d, indices, scales)


def gather_scale_rows_reference(g2d: Tensor, indices: Tensor, scales: Tensor) -> Tensor:
    out_dtype = torch.float32 if g2d.dtype == torch.float16 else g2d.dtype
    if g2d.dtype in (torch.float32, torch.float64):
        scales = scales if scales.dtype == g2d.dtype else scales.to(g2d.dtype)
        return g2d.index_select(0, indices) * scales.unsqueeze(1)
    return (g2d.index_select(0, indices).float() * scales.unsqueeze(1)).to(out_dtype)
