"""The Triton kernels against their references (``tests/kernel_cases.py``), in a process where Triton interprets."""

from __future__ import annotations

from pathlib import Path

from interpreted import run_interpreted


def test_triton_kernels_equal_their_references():
    run_interpreted(str(Path(__file__).with_name("kernel_cases.py")))
