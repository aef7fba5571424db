"""Running the Triton kernels on CPU tensors with Triton's interpreter (``TRITON_INTERPRET=1``), as CI does."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import pytest

#: The modules defining Triton kernels, in import order (later ones import earlier ones).
TRITON_MODULES = ("wtacrs.kernels.convert_triton", "wtacrs.kernels.rows_triton", "wtacrs.kernels.bits_triton")


@contextlib.contextmanager
def triton_interpreter() -> Iterator[None]:
    """Inside: ``wtacrs.kernels`` dispatches CPU tensors to its Triton kernels, run by the interpreter. The kernel
    modules are (re)loaded under the variable, since ``triton.jit`` reads it when a kernel is defined, and
    reloaded without it after."""
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRITON_INTERPRET", "1")
            _reload()
            yield
    finally:
        _reload()


def _reload() -> None:
    for name in TRITON_MODULES:
        importlib.reload(importlib.import_module(name))
