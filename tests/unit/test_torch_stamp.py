"""The validated-torch stamp: its key (run for real in bash on a venv-shaped folder) changes with whatever would
change torch's answer and with nothing else; the TorchInfo fact tells a stamped answer from a fresh import. The
check after an install: TORCH_PROBE's real output judged by decide.torch_problems."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pyinfra.api.exceptions import FactProcessError

from gpufleet import facts
from gpufleet.decide import torch_problems
from gpufleet.facts import NO_TOOL, parse_torch_info
from gpufleet.operations import installed_torch_problems

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



def probe(tmp_path: Path, torch_init: str | None) -> subprocess.CompletedProcess:
    """facts.TORCH_PROBE run for real by this interpreter, against a torch package made of `torch_init` (None: no
    torch at all), as the torch stage runs it on a host right after the install."""
    if torch_init is not None:
        (tmp_path / "torch").mkdir(parents=True)
        (tmp_path / "torch" / "__init__.py").write_text(torch_init)
    tmp_path.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    # -S: no site-packages, so a torch installed on this machine is never the one probed.
    return subprocess.run([sys.executable, "-S", "-c", facts.TORCH_PROBE], capture_output=True, text=True, env=env,
                          cwd=tmp_path)


def torch_module(version: str, cuda: str | None, archs: list[str]) -> str:
    return (f"import types\n__version__ = {version!r}\nversion = types.SimpleNamespace(cuda={cuda!r})\n"
            f"cuda = types.SimpleNamespace(get_arch_list=lambda: {archs!r})\n")


def check_after_install(tmp_path: Path, torch_init: str | None, archs: tuple[str, ...] = ("12.0",)) -> list[str]:
    done = probe(tmp_path, torch_init)
    return installed_torch_problems(done.returncode == 0, done.stdout, done.stderr, "12.8", list(archs))


def test_a_freshly_installed_torch_for_the_toolkit_and_the_gpu_passes_the_check(tmp_path: Path) -> None:
    assert check_after_install(tmp_path, torch_module("2.12.0.dev20260407+cu128", "12.8", ["sm_90", "sm_120"])) == []


def test_a_freshly_installed_torch_is_judged_by_the_same_rule_as_an_installed_one(tmp_path: Path) -> None:
    info = {"version": "2.12.0.dev20260407+cu128", "cuda": "12.8", "arch_list": ["sm_80", "sm_90"]}
    found = check_after_install(tmp_path, torch_module(info["version"], info["cuda"], info["arch_list"]))
    assert found == torch_problems(info, "12.8", ["12.0"]) and "no sm_120 code" in found[0]


def test_a_cpu_build_or_another_cuda_fails_the_check(tmp_path: Path) -> None:
    cpu = check_after_install(tmp_path / "cpu", torch_module("2.12.0", None, []))
    assert len(cpu) == 1 and "CPU build" in cpu[0]
    other = check_after_install(tmp_path / "cu130", torch_module("2.12.0+cu130", "13.0", ["sm_120"]))
    assert len(other) == 1 and "built for CUDA 13.0" in other[0]


def test_a_torch_that_does_not_import_fails_the_check_with_pythons_error(tmp_path: Path) -> None:
    missing = check_after_install(tmp_path / "missing", None)
    assert len(missing) == 1 and "does not import" in missing[0] and "No module named 'torch'" in missing[0]
    broken = check_after_install(tmp_path, "raise ImportError('libcudart.so.12: cannot open shared object file')")
    assert len(broken) == 1 and "libcudart.so.12" in broken[0]


def test_a_probe_that_prints_no_torch_information_fails_the_check_naming_the_output() -> None:
    found = installed_torch_problems(True, "Segmentation fault\n", "", "12.8", ["12.0"])
    assert len(found) == 1 and "Segmentation fault" in found[0]
