"""The validated-torch stamp: its key (run for real in bash on a venv-shaped folder) changes with whatever would
change torch's answer and with nothing else; the TorchInfo fact tells a stamped answer from a fresh import."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pyinfra.api.exceptions import FactProcessError

from gpufleet import facts
from gpufleet.facts import NO_TOOL, parse_torch_info

INFO = '{"version": "2.14.1+cu130", "cuda": "13.0", "arch_list": ["sm_90", "sm_120"]}'
CONTEXT = "gpus=2b87 driver=580.95.05"


def make_venv(root: Path) -> Path:
    """A venv's shape: bin/python, torch's package folder, its library folder and its dist-info RECORD."""
    site = root / "lib" / "python3.11" / "site-packages"
    (site / "torch" / "lib").mkdir(parents=True)
    (site / "torch-2.14.1+cu130.dist-info").mkdir()
    (site / "torch-2.14.1+cu130.dist-info" / "RECORD").write_text("torch/__init__.py,sha256=abc,10\n")
    (root / "bin").mkdir()
    (root / "bin" / "python").write_text("#!/bin/sh\n")
    (root / "bin" / "python").chmod(0o755)
    return root / "bin" / "python"


def key(python: Path, context: str = CONTEXT) -> str:
    out = subprocess.run(["bash", "-c", facts.torch_state_key_command(str(python), context)], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert len(out) == 64
    return out


def test_the_key_is_stable_while_nothing_changes(tmp_path: Path) -> None:
    python = make_venv(tmp_path / "venv")
    assert key(python) == key(python)


@pytest.mark.parametrize("change", ["record", "torch file added", "library added", "interpreter", "gpu", "driver"])
def test_the_key_changes_with_torch_its_interpreter_the_gpus_and_the_driver(tmp_path: Path, change: str) -> None:
    python = make_venv(tmp_path / "venv")
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    before = key(python)
    context = CONTEXT
    if change == "record":
        (site / "torch-2.14.1+cu130.dist-info" / "RECORD").write_text("torch/__init__.py,sha256=def,10\n")
    elif change == "torch file added":
        (site / "torch" / "extra.py").write_text("")
        os.utime(site / "torch", (1, 1))
    elif change == "library added":
        (site / "torch" / "lib" / "libextra.so").write_text("")
        os.utime(site / "torch" / "lib", (1, 1))
    elif change == "interpreter":
        python.write_text("#!/bin/sh\n# another build\n")
    elif change == "gpu":
        context = "gpus=2b85,2b87 driver=580.95.05"
    else:
        context = "gpus=2b87 driver=580.105.08"
    assert key(python, context) != before


def test_a_stamped_answer_and_a_fresh_import_are_told_apart() -> None:
    stamped = parse_torch_info(f"== stamp\n{INFO}")
    probed = parse_torch_info(f"== probed\nsome warning\n{INFO}")
    assert stamped is not None and stamped["stamped"] and stamped["version"] == "2.14.1+cu130"
    assert probed is not None and not probed["stamped"] and probed["arch_list"] == ["sm_90", "sm_120"]
    assert parse_torch_info(NO_TOOL) is None


def test_a_garbled_stamp_fails_that_host_only() -> None:
    with pytest.raises(FactProcessError):
        facts.TorchInfo().process(["== stamp", '{"version": "2.14.1"}'])
    with pytest.raises(FactProcessError):
        facts.TorchInfo().process(["== stamp", "not json"])


def test_the_stamp_is_trusted_only_in_root_s_own_folder() -> None:
    command = facts.TorchInfo().command("/opt/torchvenv/bin/python", CONTEXT)
    stamp = facts.torch_stamp_path("/opt/torchvenv/bin/python")
    assert stamp.startswith(f"{facts.STATE_DIR}/torch-")
    assert f'"$(stat -c %u:%a {facts.STATE_DIR} 2>/dev/null)" = 0:700' in command
    assert f"[ ! -L {stamp} ]" in command and f'"$(stat -c %u {stamp})" = 0' in command
    record = facts.record_torch_state_command("/opt/torchvenv/bin/python", CONTEXT)
    assert record.startswith(f"install -d -m 700 -o root -g root {facts.STATE_DIR} && ")

