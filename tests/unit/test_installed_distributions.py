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


def test_a_venvs_distributions_are_read_without_running_anything_from_the_venv(tmp_path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    for folder in ("torch-2.12.0.dev20260407+cu128.dist-info", "typing_extensions-4.12.2.dist-info"):
        (site / folder).mkdir()
    # What the build user could plant: a .pth line runs whenever that venv's Python starts.
    ran = tmp_path / "ran"
    (site / "planted.pth").write_text(f"import pathlib; pathlib.Path({str(ran)!r}).write_text('ran')\n")
    assert read(InstalledDistributions, str(venv / "bin" / "python")) == {
        "torch": "2.12.0.dev20260407+cu128", "typing-extensions": "4.12.2"}
    assert not ran.exists()
