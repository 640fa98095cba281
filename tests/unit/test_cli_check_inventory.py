"""`gpufleet check-inventory`: validates without contacting anything, lists every problem, exit 2."""

import subprocess
import sys

from gpufleet.settings import REPO_ROOT


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpufleet.cli", "check-inventory", *args],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )


def test_shipped_inventory_is_valid():
    result = check()
    assert result.returncode == 0, result.stderr
    assert "valid, 1 host(s) (workstations: @local)" in result.stdout


def test_every_problem_is_listed_with_exit_2(tmp_path):
    path = tmp_path / "hosts.yaml"
    path.write_text("settings:\n  reboot_polcy: never\ngroups:\n  workstatons:\n    hosts: {ws01: {}}\n")
    result = check(str(path))
    assert result.returncode == 2
    assert f"{path}:2: fleet settings: unknown setting 'reboot_polcy'. Did you mean 'reboot_policy'?" in result.stderr
    assert f"{path}:4: groups: unknown group 'workstatons'. Did you mean 'workstations'?" in result.stderr


def test_example_inventories_are_valid():
    for example in sorted((REPO_ROOT / "inventory" / "examples").glob("*.yaml")):
        result = check(str(example))
        assert result.returncode == 0, f"{example}: {result.stderr}"
