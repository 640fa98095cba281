"""Shared helpers: the repository root, and the real pyinfra CLI run from it against this checkout's code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# This checkout's gpufleet first, even where another checkout is pip-installed in editable mode.
if str(REPO_ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(REPO_ROOT))


def run_pyinfra(*args: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """The real `pyinfra` command, run from the repository root the way users run it."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYINFRA_PROGRESS": "off", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pyinfra", *args],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
