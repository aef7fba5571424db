"""The two steps of a WTA-CRS draw around ``torch.topk`` and ``torch.multinomial`` (``wtacrs.sampling``).

For G rows of N weights and k slots: ``wta_crs_rest`` takes the k largest weights and finds the winner count c
(the first minimiser of ``rest_c / (k - c)``, ``rest_c`` the mass outside the c largest) and the distribution of
the draws (the weights with the winners set to 0); ``wta_crs_slots`` turns the winners and the draws into the k
slots (index, scale), and can gather the kept rows of an input at once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .dispatch import TRITON_FLOATS, device_constant, use_triton


def wta_crs_rest(p: Tensor, safe: Tensor, top_p: Tensor, top_idx: Tensor,
                 counter: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(rest_p, stats)`` for weights ``p`` (G, N), ``safe`` = ``p`` with every weight put in [tiny, max], and the
    k largest safe weights ``top_p`` (G, k, descending) at ``top_idx``.

    ``rest_p`` (G, N) is ``safe`` with the c winners set to 0; ``stats`` (G, 2) float32 holds c and the sum of
    ``rest_p``, that sum NaN where the sum of ``p`` is not finite. ``counter`` (0-d float32) gets the sum of ``p``
    added (``wtacrs.health``).
    """
    if use_triton(p, safe, top_p, top_idx):
        from .draws_triton import wta_crs_rest_triton

        return wta_crs_rest_triton(p, safe, top_p, top_idx, counter)
    return wta_crs_rest_reference(p, safe, top_p, top_idx, counter)


def wta_crs_rest_reference(p: Tensor, safe: Tensor, top_p: Tensor, top_idx: Tensor,
                           counter: Tensor | None = None) -> tuple[Tensor, Tensor]:
    total = p.sum(-1, keepdim=True)
    if counter is not None:
        counter.add_(total.sum())
    slots, draws_left = _slot_constants(top_p.shape[-1], p.device)
    # rest[..., c]: the mass outside the c largest rows, c = 0..k-1 (c = 0 is plain CRS). The winner count c
    # minimises rest / (k - c): its first minimiser, so that ties keep the draws.
    rest = torch.sub(safe.sum(-1, keepdim=True), torch.cumsum(top_p, -1)).add_(top_p)
    c = torch.argmin(rest / draws_left, dim=-1, keepdim=True)
    # The draws come from p without the winners; their mass is summed from that very distribution (rest[c] has
    # cancellation error when the winners hold almost all of it).
    rest_p = safe.scatter(-1, top_idx, top_p.masked_fill(slots < c, 0.0))
    mass = torch.where(total.isfinite(), rest_p.sum(-1, keepdim=True), math.nan)
    return rest_p, torch.cat((c.float(), mass), -1)


def wta_crs_slots(safe: Tensor, top_idx: Tensor, drawn: Tensor, stats: Tensor, rows_of: Tensor | None = None,
                  dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(indices, scales, rows)``: slot t < c holds winner ``top_idx[t]`` with scale 1, the others the draws
    ``drawn[t]`` (from ``rest_p``) with scale ``mass / ((k - c) * safe[drawn[t]])``; every scale of a row whose
    mass is NaN is NaN. Indices int64, scales float32, both (G, k). With ``rows_of`` (N, d) (G = 1): also
    ``rows_of[indices]`` in ``dtype`` (k, d), else ``rows`` is None."""
    if (use_triton(safe, top_idx, drawn, stats)
            and (rows_of is None or rows_of.dtype in TRITON_FLOATS and use_triton(rows_of))):
        from .draws_triton import wta_crs_slots_triton

        return wta_crs_slots_triton(safe, top_idx, drawn, stats, rows_of, dtype)
    return wta_crs_slots_reference(safe, top_idx, drawn, stats, rows_of, dtype)


def wta_crs_slots_reference(safe: Tensor, top_idx: Tensor, drawn: Tensor, stats: Tensor,
                            rows_of: Tensor | None = None,
                            dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    k = top_idx.shape[-1]
    c, mass = stats.split(1, dim=-1)  # c as float32: exact
    is_winner = _slot_constants(k, safe.device)[0] < c
    scales = (mass / ((k - c) * safe.gather(-1, drawn))).masked_fill(is_winner, 1.0)
    indices = torch.where(is_winner, top_idx, drawn)
    scales = torch.where(mass.isnan(), math.nan, scales)
    if rows_of is None:
        return indices, scales, None
    rows = rows_of.index_select(0, indices if indices.dim() == 1 else indices.view(-1))
    return indices, scales, rows if dtype is None or rows.dtype == dtype else rows.to(dtype)


@device_constant
def _slot_constants(k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``arange(k)`` and ``k - arange(k)`` (float32) on ``device``, made once per (k, device)."""
    slots = torch.arange(k, device=device)
    return slots, (k - slots).float()
