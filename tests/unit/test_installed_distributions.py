"""InstalledDistributions, the cheap stand-in for `pip freeze --all` that pip_packages reads, run for real here."""

from __future__ import annotations

import subprocess
import sys

from gpufleet.facts import InstalledDistributions, PipFreeze


def read(fact: type, python: str):
    out = subprocess.run(["sh", "-c", fact().command(python=python)], capture_output=True, text=True, check=True)
    return fact().process(out.stdout.splitlines())


def test_installed_distributions_are_what_pip_freeze_lists_in_this_interpreter() -> None:
    ours, frozen = read(InstalledDistributions, sys.executable), read(PipFreeze, sys.executable)
    # pip prints an editable install as a comment and an -e line; every other entry must agree.
    plain = {name: version for name, version in frozen.items() if not name.startswith("#")}
    assert plain and {name: ours.get(name) for name in plain} == plain
    assert "pip" in ours


def test_a_missing_interpreter_has_no_distributions_rather_than_none_installed() -> None:
    assert read(InstalledDistributions, "/nonexistent/venv/bin/python") is None
