"""InterruptedPackageInstall and PipFreeze read from real command output: this machine's, or a captured file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyinfra

from gpufleet.facts import InterruptedPackageInstall, PipFreeze

CAPTURED = Path(__file__).resolve().parent.parent / "data" / "captured"


def _run(command: str) -> list[str]:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout.splitlines()


def test_an_install_cut_off_mid_configure_is_seen_as_interrupted():
    lines = (CAPTURED / "dpkg-interrupted-half-configured.txt").read_text().splitlines()
    assert lines[-1] == "rc=0"
    assert InterruptedPackageInstall().process(lines[:-1]) is True


def test_a_journal_entry_alone_is_seen_as_interrupted():
    assert InterruptedPackageInstall().process(["/var/lib/dpkg/updates/0000"]) is True


def test_no_output_and_blank_lines_read_as_nothing_interrupted():
    assert InterruptedPackageInstall().process([]) is False
    assert InterruptedPackageInstall().process(["", "  "]) is False


def test_pip_freeze_lists_this_interpreter_s_packages_with_pip_itself():
    packages = PipFreeze().process(_run(PipFreeze().command(python=sys.executable)))
    # --all: pip, setuptools and wheel are listed too; names are normalised as pip compares them.
    assert "pip" in packages
    assert packages["pyinfra"] == pyinfra.__version__


def test_pip_freeze_of_a_missing_interpreter_is_none_not_an_empty_environment():
    assert PipFreeze().process(_run(PipFreeze().command(python="/nonexistent/venv/bin/python"))) is None
