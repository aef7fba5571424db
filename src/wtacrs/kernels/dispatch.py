"""When the Triton version of a kernel runs instead of its reference."""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

#: Floating-point dtypes the Triton kernels take; others (float64) go to the references.
TRITON_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: Triton runs its kernels on the CPU with its interpreter (slowly). The kernels then
    serve CPU tensors too, so that tests can run them without a GPU; the variable must be set before the
    ``*_triton`` modules are first imported (``triton.jit`` reads it when a kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: Tensor) -> bool:
    """Triton for CUDA tensors in eager mode (compiled code leaves fusion to Inductor), and for CPU tensors under
    ``TRITON_INTERPRET=1``; the references everywhere else."""
    if torch.compiler.is_compiling() or not triton_available():
        return False
    if interpreting():
        return all(t.device.type in ("cpu", "cuda") for t in tensors)
    return all(t.is_cuda for t in tensors)
