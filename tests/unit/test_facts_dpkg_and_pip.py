"""InterruptedPackageInstall and PipFreeze read from real command output: this machine's, or a captured file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_pip_freeze_lists_a_venv_s_packages_with_pip_itself(tmp_path):
    # A venv of its own (pip from ensurepip, no network), so the verdict is the same on every machine.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "Typing_Extensions-4.12.2.dist-info").mkdir()
    (site / "Typing_Extensions-4.12.2.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: Typing_Extensions\nVersion: 4.12.2\n")
    packages = PipFreeze().process(_run(PipFreeze().command(python=str(venv / "bin" / "python"))))
    # --all: pip is listed too; names are normalised as pip compares them.
    pip_version = subprocess.run([str(venv / "bin" / "python"), "-c", "import pip; print(pip.__version__)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    assert packages["pip"] == pip_version
    assert packages["typing-extensions"] == "4.12.2"


def test_pip_freeze_of_a_missing_interpreter_is_none_not_an_empty_environment():
    assert PipFreeze().process(_run(PipFreeze().command(python="/nonexistent/venv/bin/python"))) is None
