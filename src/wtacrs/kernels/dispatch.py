"""When the Triton version of a kernel runs instead of its reference."""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors (slowly), as the tests use them."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: Tensor) -> bool:
    """Triton for CUDA tensors in eager mode (compiled code leaves fusion to Inductor); never on CPU."""
    return (
        all(t.is_cuda for t in tensors) and triton_available() and not torch.compiler.is_compiling()
    )
