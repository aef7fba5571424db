"""Running tests with the Triton kernels on CPU tensors, under Triton's interpreter (``TRITON_INTERPRET=1``).

The variable must be set before ``triton`` is first imported (its own library kernels are defined then; peft and
torch._dynamo import it), so such tests run in a process of their own: in the usual test process, a test module
calls ``run_interpreted`` on itself, which runs it again in a child process with the variable set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def run_interpreted(test_file: str, timeout: float = 600) -> None:
    """Run ``test_file``'s tests with pytest in a child process under ``TRITON_INTERPRET=1``; fail with its report
    if any of them fails."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning", test_file],
        cwd=Path(test_file).parent.parent, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, f"{Path(test_file).name} under TRITON_INTERPRET=1:\n{result.stdout[-8000:]}"
