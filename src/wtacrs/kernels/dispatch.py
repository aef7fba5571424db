"""When the Triton version of a kernel runs instead of its reference."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

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


def device_constant(make: Callable[..., T]) -> Callable[..., T]:
    """Cache ``make(*args)`` (a small constant tensor) per arguments in eager mode, saving its kernel launches on
    every call; under ``torch.compile`` call ``make`` itself, which the compiler folds into the graph (Dynamo
    would trace through the cache anyway, warning about it)."""
    cached = functools.lru_cache(maxsize=64)(make)

    @functools.wraps(make)
    def get(*args):
        return make(*args) if torch.compiler.is_compiling() else cached(*args)

    return get
