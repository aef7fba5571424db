"""Storing float32 results in the output's dtype with PyTorch's rounding (shared by the Triton kernels)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def store_as(ptr, value, mask):
    """Store float32 ``value`` at ``ptr`` in its element type, rounded to nearest even as PyTorch's ``.to()``
    rounds. bfloat16 is rounded here, bit by bit (Triton's interpreter truncates in its own cast)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(value != value, 0x7FC0, rounded)  # NaN stays NaN (the rounding could carry it to Inf)
        tl.store(ptr, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)
