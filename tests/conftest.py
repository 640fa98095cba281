"""Shared helpers: the repository root, the real pyinfra CLI run from it, what the suite installs and builds for
itself (lab tools, the xformers sdist and wheel), and the rule that under CI=true a test that cannot run fails."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# This checkout's gpufleet first, even where another checkout is pip-installed in editable mode.
if str(REPO_ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(REPO_ROOT))


def run_pyinfra(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real `pyinfra` command, run from the repository root the way users run it. The limit only stops a hung
    run: the whole fleet's plan takes about 30 s of CPU, and minutes on a loaded 2-core machine."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYINFRA_PROGRESS": "off", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pyinfra", *args],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


IN_CI = os.environ.get("CI", "").lower() == "true"


def cannot_run(reason: str) -> NoReturn:
    """A test that cannot run here: under CI=true that is a failure, never a skip; elsewhere a skip naming why."""
    if IN_CI:
        pytest.fail(f"cannot run under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@dataclass
class Timing:
    label: str
    seconds: float
    note: str = ""


# Set-up steps and lab modules, timed so the run's summary shows what a cold machine costs (.ci/run).
TIMINGS: list[Timing] = []
_module_seconds: dict[str, float] = {}


@contextmanager
def timed(label: str, note: str = "") -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        TIMINGS.append(Timing(label, time.monotonic() - start, note))


@pytest.fixture(scope="session")
def lab_tools() -> None:
    """The lab's Debian tools (pciutils, kmod, mmdebstrap, ...) on this machine, installed with apt when missing."""
    from gpufleet_lab.system import LabError, ensure_tools, missing_tools

    missing = missing_tools()
    if not missing:
        return
    if os.geteuid() != 0:
        cannot_run(f"lab tools missing ({', '.join(missing)}) and installing them needs root")
    try:
        with timed("lab tools (apt)", ", ".join(missing)):
            ensure_tools()
    except LabError as error:
        cannot_run(f"lab tools missing ({', '.join(missing)}) and apt could not install them: {error}")


@pytest.fixture(scope="session")
def xformers_sdist() -> Path:
    """The real xformers sdist, checked against its pinned sha256 (CI's build cache, else fetched from PyPI)."""
    from gpufleet_lab.ci_build import SDIST_SHA256, sdist_path
    from gpufleet.fingerprint import file_sha256

    if sdist_path().exists() and file_sha256(sdist_path()) == SDIST_SHA256:
        return sdist_path()
    from gpufleet_lab import downloads
    from gpufleet_lab.system import LabError
    try:
        with timed("xformers sdist (PyPI)"):
            return downloads.xformers_sdist()
    except (LabError, OSError) as error:
        cannot_run(f"the xformers sdist is not cached and could not be fetched from PyPI: {error}")


@pytest.fixture(scope="session")
def ci_wheel():
    """The real sm_120 xformers wheel, built with this machine's nvcc the way a host builds it (cached by fingerprint)."""
    from gpufleet_lab import ci_build

    nvcc = Path(ci_build.CUDA_HOME, "bin/nvcc")
    if not nvcc.exists():
        cannot_run(f"no nvcc at {nvcc}: the build tests compile xformers with this machine's CUDA 13.0")
    cached = any(ci_build.CACHE.glob("xformers/*/manifest.json"))
    try:
        with timed("xformers build (ci_build)", "cache had a wheel" if cached else "cold"):
            return ci_build.ensure_wheel()
    except (subprocess.CalledProcessError, SystemExit) as error:
        pytest.fail(f"the CI xformers build failed: {error}", pytrace=False)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "/lab/" in f"/{report.nodeid}":
        module = report.nodeid.split("::", 1)[0]
        _module_seconds[module] = _module_seconds.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TIMINGS and not _module_seconds:
        return
    terminalreporter.section("set-up and lab timings")
    for timing in TIMINGS:
        note = f"  ({timing.note})" if timing.note else ""
        terminalreporter.write_line(f"{timing.seconds:8.1f} s  {timing.label}{note}")
    for module, seconds in sorted(_module_seconds.items()):
        terminalreporter.write_line(f"{seconds:8.1f} s  {module}")
