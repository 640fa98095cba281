"""The HTML fleet report, opened in a real headless chromium (Debian's `chromium` package, installed when missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI") == "true"


def _unavailable(reason: str) -> None:
    """Under CI a browser that cannot be had is a failure; elsewhere the test is skipped, saying why."""
    if IN_CI:
        pytest.fail(f"headless chromium is needed and {reason}")
    pytest.skip(f"headless chromium is needed and {reason}")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium binary; installed with apt-get (as root) on a machine that lacks it."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0:
        _unavailable("is not installed; installing it needs root (apt-get install -y chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    install = ["apt-get", *lock, "install", "-y", "--no-install-recommends", "chromium"]
    proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        # Stale package lists are the usual reason on a fresh machine.
        subprocess.run(["apt-get", *lock, "update"], env=env, capture_output=True, timeout=600, check=False)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1800, check=False)
    found = shutil.which("chromium")
    if proc.returncode != 0 or not found:
        _unavailable(f"`{' '.join(install)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return found


def test_chromium_is_there(chromium: str) -> None:
    out = subprocess.run([chromium, "--version"], capture_output=True, text=True, timeout=60)
    assert "Chromium" in out.stdout
