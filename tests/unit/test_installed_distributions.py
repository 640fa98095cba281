"""InstalledDistributions, the cheap stand-in for `pip freeze --all` that pip_packages reads, run for real here."""

from __future__ import annotations

import subprocess
import sys

from gpufleet.facts import _DISTRIBUTIONS, InstalledDistributions, PipFreeze, parse_pip_freeze


def read(fact: type, python: str):
    out = subprocess.run(["sh", "-c", fact().command(python=python)], capture_output=True, text=True, check=True)
    return fact().process(out.stdout.splitlines())


def test_installed_distributions_are_what_pip_freeze_lists_in_a_venv(tmp_path) -> None:
    # A venv of its own (pip from ensurepip, no network), so the verdict is the same on every machine.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    ours, frozen = read(InstalledDistributions, python), read(PipFreeze, python)
    assert "pip" in frozen and ours == frozen


def test_a_venv_that_sees_the_system_packages_is_read_by_its_python(tmp_path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "torch-2.11.0.dist-info").mkdir()
    (site / "torch-2.11.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.11.0\n")
    python = str(venv / "bin" / "python")
    listed = subprocess.run([python, "-I", "-c", _DISTRIBUTIONS], capture_output=True, text=True, check=True).stdout
    # The system's packages as well as the venv's own: what the venv's Python itself lists.
    assert read(InstalledDistributions, python) == parse_pip_freeze(listed)
    assert parse_pip_freeze(listed)["torch"] == "2.11.0"


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
