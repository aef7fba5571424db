"""Triton versions of the 1-bit mask kernels (``bits.py`` holds the references and says when these run).

Masks are packed in the logical (row-major) order of the tensor they describe, so tensors with other strides are
made contiguous first, as the references' ``reshape(-1)`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .convert_triton import store_as

_BLOCK_BYTES = 1024
_BLOCK = 4096

#: How ``_pack_kernel`` reads a bit from an element: set where the element is non-zero, or where it is not <= 0.
_NONZERO, _NOT_LE_ZERO = 0, 1
#: How ``_masked_grad_kernel`` passes the gradient: ``where(m, g, 0)``, or ``(g * m) * scale`` with the scale a
#: number or a 0-d tensor.
_WHERE, _SCALE_NUMBER, _SCALE_TENSOR = 0, 1, 2


@triton.jit
def _pack_kernel(src, out, n, n_bytes, TEST: tl.constexpr, BLOCK: tl.constexpr):
    byte = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    bit = tl.arange(0, 8)
    element = byte[:, None].to(tl.int64) * 8 + bit[None, :]
    v = tl.load(src + element, mask=element < n, other=0).to(tl.float32)  # (the interpreter compares bf16 as bits)
    if TEST == 0:
        on = v != 0
    else:
        on = ~(v <= 0)  # NaN passes
    on = on & (element < n)
    packed = tl.sum(on.to(tl.int32) << bit[None, :], axis=1)
    tl.store(out + byte, packed.to(tl.uint8), mask=byte < n_bytes)


def _pack(src: Tensor, test: int) -> Tensor:
    flat = src if src.is_contiguous() else src.reshape(-1)
    n = flat.numel()
    n_bytes = (n + 7) // 8
    out = torch.empty(n_bytes, dtype=torch.uint8, device=src.device)
    _pack_kernel[(triton.cdiv(n_bytes, _BLOCK_BYTES),)](flat, out, n, n_bytes, TEST=test, BLOCK=_BLOCK_BYTES)
    return out


def pack_bits_triton(mask: Tensor) -> Tensor:
    return _pack(mask, _NONZERO)


@triton.jit
def _bit(packed, element, ok):
    byte = tl.load(packed + element // 8, mask=ok, other=0).to(tl.int32)
    return ((byte >> (element % 8).to(tl.int32)) & 1) != 0


@triton.jit
def _unpack_kernel(packed, out, n, BLOCK: tl.constexpr):
    element = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = element < n
    tl.store(out + element, _bit(packed, element, ok), mask=ok)


def unpack_bits_triton(packed: Tensor, numel: int) -> Tensor:
    out = torch.empty(numel, dtype=torch.bool, device=packed.device)
    _unpack_kernel[(triton.cdiv(numel, _BLOCK),)](packed, out, numel, BLOCK=_BLOCK)
    return out


def relu_with_mask_triton(x: Tensor, inplace: bool = False) -> tuple[Tensor, Tensor]:
    # The output is torch's own ReLU (the sign of zero and NaN payloads as on this device); the mask is one pass.
    out = torch.relu_(x) if inplace else torch.relu(x)
    return out, _pack(out, _NOT_LE_ZERO)


@triton.jit
def _masked_grad_kernel(grad, packed, out, n, scale, MODE: tl.constexpr, BLOCK: tl.constexpr):
    element = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = element < n
    on = _bit(packed, element, ok)
    g = tl.load(grad + element, mask=ok, other=0.0)
    if MODE == 0:
        tl.store(out + element, tl.where(on, g, 0.0).to(g.dtype), mask=ok)
    else:
        if MODE == 1:
            s = scale
        else:
            s = tl.load(scale).to(tl.float32)
        # g * 0 is -0.0 for negative g and NaN for non-finite g, as in the reference's arithmetic.
        store_as(out + element, (g.to(tl.float32) * on.to(tl.float32)) * s, ok)


def masked_grad_triton(grad: Tensor, packed: Tensor, scale: float | Tensor | None = None) -> Tensor:
    flat = grad if grad.is_contiguous() else grad.contiguous()
    n = flat.numel()
    out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    if scale is None:
        mode, scale = _WHERE, 0.0
    elif isinstance(scale, Tensor):
        mode = _SCALE_TENSOR
    else:
        mode, scale = _SCALE_NUMBER, float(scale)
    _masked_grad_kernel[(triton.cdiv(n, _BLOCK),)](flat, packed, out, n, scale, MODE=mode, BLOCK=_BLOCK)
    return out


@triton.jit
def _masked_rows_kernel(rows, indices, packed, value, out, k, d, HAS_INDICES: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    slots = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = (slots < k)[:, None] & (cols < d)[None, :]
    if HAS_INDICES:
        source = tl.load(indices + slots, mask=slots < k, other=0).to(tl.int64)
    else:
        source = slots.to(tl.int64)
    on = _bit(packed, source[:, None] * d + cols[None, :], ok)
    at = slots[:, None].to(tl.int64) * d + cols[None, :]
    r = tl.load(rows + at, mask=ok, other=0.0).to(tl.float32)
    store_as(out + at, r * on.to(tl.float32) * tl.load(value).to(tl.float32), ok)


def masked_rows_triton(rows: Tensor, indices: Tensor | None, packed: Tensor, value: Tensor) -> Tensor:
    rows = rows.contiguous()
    k, d = rows.shape
    out = torch.empty_like(rows)
    value = value if value.dtype == rows.dtype else value.to(rows.dtype)  # the reference rounds it so
    block_d = min(triton.next_power_of_2(d), 256)
    block_m = max(1, _BLOCK // block_d)
    _masked_rows_kernel[(triton.cdiv(k, block_m), triton.cdiv(d, block_d))](
        rows, rows if indices is None else indices, packed, value, out, k, d, HAS_INDICES=indices is not None,
        BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return out
