"""1-bit masks for compact ReLU and dropout: pack a bool tensor eight elements to a byte, unpack it, and the two
fused steps around them (ReLU that also packs its mask; a gradient passed through a packed mask)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import TRITON_FLOATS, device_constant, use_triton


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a bool tensor into uint8, 8 elements per byte (element ``8*i + j`` of ``mask.reshape(-1)`` is bit ``j``
    of byte ``i``). A tensor of 0s and 1s of another dtype packs the same way.

    The last byte is zero-padded; ``unpack_bits(pack_bits(m), m.numel()).view(m.shape)`` equals ``m``.
    """
    if use_triton(mask):
        from .bits_triton import pack_bits_triton

        return pack_bits_triton(mask)
    return pack_bits_reference(mask)


def pack_bits_reference(mask: Tensor) -> Tensor:
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    # Each group of 8 bytes (0 or 1) read as one little-endian int64 has byte j at bit 8j; multiplying by
    # sum_j 2**(56 - 7j) moves byte j's bit to bit 56 + j without carries, so bits 56..63 are the packed byte.
    # One vectorised multiply instead of eight strided shifts and ORs (little-endian, as every PyTorch platform).
    words = flat.view(torch.int64)
    return ((words * 0x0102040810204080) >> 56).to(torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """The flat bool tensor of ``numel`` elements that ``pack_bits`` packed."""
    if use_triton(packed):
        from .bits_triton import unpack_bits_triton

        return unpack_bits_triton(packed, numel)
    return unpack_bits_reference(packed, numel)


def unpack_bits_reference(packed: Tensor, numel: int) -> Tensor:
    return ((packed.unsqueeze(1) >> _shifts(packed.device)) & 1).view(-1)[:numel].bool()


@device_constant
def _shifts(device: torch.device) -> Tensor:
    """``arange(8)`` as uint8 on ``device``, made once."""
    return torch.arange(8, dtype=torch.uint8, device=device)


def relu_with_mask(x: Tensor, inplace: bool = False) -> tuple[Tensor, Tensor]:
    """``(torch.relu(x), pack_bits(~(relu(x) <= 0)))`` (``torch.relu_`` with ``inplace``): the output and the packed
    mask of where its gradient passes (``threshold_backward`` passes it where the output is not ``<= 0``, NaN
    included)."""
    if use_triton(x):
        from .bits_triton import relu_with_mask_triton

        return relu_with_mask_triton(x, inplace)
    return relu_with_mask_reference(x, inplace)


def relu_with_mask_reference(x: Tensor, inplace: bool = False) -> tuple[Tensor, Tensor]:
    out = torch.relu_(x) if inplace else torch.relu(x)
    return out, pack_bits_reference(~(out <= 0))


def masked_grad(grad: Tensor, packed: Tensor, scale: float | Tensor | None = None) -> Tensor:
    """The gradient through a packed mask ``m``: ``where(m, grad, 0)`` (ReLU) when ``scale`` is None, else ``grad * m
    * scale`` as ``native_dropout_backward`` computes it: in float32 for half-precision ``grad``, rounded once.
    ``scale`` is a number, or a 0-d tensor (read in its own dtype: CPU dropout's ``grad * noise`` when it holds the
    noise's kept value)."""
    if grad.dtype in TRITON_FLOATS and use_triton(grad, packed):
        from .bits_triton import masked_grad_triton

        return masked_grad_triton(grad, packed, scale)
    return masked_grad_reference(grad, packed, scale)


def masked_grad_reference(grad: Tensor, packed: Tensor, scale: float | Tensor | None = None) -> Tensor:
    mask = unpack_bits_reference(packed, grad.numel()).view(grad.shape)
    if scale is None:
        return torch.where(mask, grad, 0.0)
    if not isinstance(scale, Tensor):
        return torch.ops.aten.native_dropout_backward(grad, mask, scale)
    if grad.dtype in (torch.float16, torch.bfloat16):
        return (grad.float() * mask * scale).to(grad.dtype)
    return grad * mask * scale


def masked_rows(rows: Tensor, indices: Tensor | None, packed: Tensor, value: Tensor) -> Tensor:
    """``rows * m * value`` in ``rows``' dtype, ``m`` the rows ``indices`` (all rows if None) of the packed mask of a
    (N, d) tensor, d a multiple of 8 (so that a row is whole bytes): the kept rows of ``dropout(x)`` rebuilt from
    kept rows (k, d) of ``x`` (``wtacrs.lora``)."""
    if rows.dtype in TRITON_FLOATS and use_triton(rows, packed, value):
        from .bits_triton import masked_rows_triton

        return masked_rows_triton(rows, indices, packed, value)
    return masked_rows_reference(rows, indices, packed, value)


def masked_rows_reference(rows: Tensor, indices: Tensor | None, packed: Tensor, value: Tensor) -> Tensor:
    k, d = rows.shape
    if indices is not None:
        packed = packed.view(-1, d // 8).index_select(0, indices).view(-1)
    keep = unpack_bits_reference(packed, k * d).view(k, d)
    return rows * (keep.to(rows.dtype) * value.to(rows.dtype))
