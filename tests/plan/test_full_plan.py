"""What `pyinfra deploys/full.py` plans for each host profile, through pyinfra's fake connector (nothing is contacted).

Each profile in tests/plan/profiles/ is one host; EXPECTED_PLAN says, in order, the operations pyinfra must plan for it.
"""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import pytest

from gpufleet import facts
from tests.conftest import run_pyinfra
from tests.plan import fake_inventory

PROFILES = Path(__file__).resolve().parent / "profiles"
INVENTORY = "tests/plan/fake_inventory.py"

# Deploy names, as the plan prefixes them to each operation name ("<deploy> | <operation>").
PREFLIGHT = "Preflight"
DRIVER = "NVIDIA driver (open kernel modules), pinned and held"
CUDA = "CUDA toolkit"
PYTHON = "Python venv for the build user"
TORCH = "PyTorch, pinned fleet-wide"
XFORMERS = "xformers built from source, once per fleet"
SMOKE = "Smoke test on the host's GPU and the fleet report"


def op(deploy: str, name: str) -> str:
    return f"{deploy} | {name}"


def refusal(deploy: str, reason: str) -> str:
    """A refusal names the host and starts with its first reason; `{host}` is filled in per profile."""
    return f"{deploy} | Refuse {{host}}: {reason}"


NOT_YET = "stage 'driver' is not implemented yet (issue #4)"

# Profile -> the operations planned for it, in order. Each entry is the start of one planned operation's name.
# When a stage lands, replace its refusal with its operations, e.g. op(DRIVER, "Install nvidia-open-580").
EXPECTED_PLAN: dict[str, list[str]] = {
    "ubuntu2404-5090d": [refusal(DRIVER, NOT_YET)],
    "ubuntu2404-5090dv2": [
        refusal(PREFLIGHT, "setting driver_branch '575' does not know the NVIDIA GeForce RTX 5090 D v2 [10de:2b8c]"),
    ],
    "wsl2-ubuntu2404": [refusal(DRIVER, NOT_YET)],
    "debian12-5090d": [refusal(DRIVER, NOT_YET)],
    "no-gpu": [refusal(PREFLIGHT, "has no NVIDIA GPU (lspci shows none)")],
    "proprietary-module-on-5090": [
        refusal(PREFLIGHT, "the proprietary NVIDIA kernel module 580.95.05 is loaded, and Blackwell GPUs need the open"),
    ],
    "secure-boot-on": [refusal(PREFLIGHT, "Secure Boot is on, and NVIDIA's repository builds unsigned DKMS modules")],
}

# Hosts that preflight must let through, whatever the later stages do.
PREFLIGHT_PASSES = {"ubuntu2404-5090d", "wsl2-ubuntu2404", "debian12-5090d"}


def profile_names() -> list[str]:
    return sorted(path.stem for path in PROFILES.glob("*.yaml"))


@cache
def planned(profile: str) -> tuple[str, ...]:
    """Operation names pyinfra plans for one profile's host (`--limit`: only that host's operations)."""
    result = run_pyinfra("-y", "--dry", "--json", "--limit", f"@fake/{profile}", INVENTORY, "deploys/full.py")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)["plan"]
    names = []
    for operation in plan:
        assert len(operation["names"]) == 1, operation
        names.append(operation["names"][0])
    return tuple(names)


def test_every_profile_has_an_expected_plan_and_every_plan_a_profile():
    assert profile_names() == sorted(EXPECTED_PLAN), "add the profile to EXPECTED_PLAN, or its YAML to profiles/"
    assert PREFLIGHT_PASSES <= set(EXPECTED_PLAN)


def test_every_profile_gives_every_output_and_valid_settings():
    for path in sorted(PROFILES.glob("*.yaml")):
        fake_inventory.load_profile(path)


def test_every_gpufleet_fact_command_is_answered_by_exactly_one_profile_output():
    # A fact whose command no profile output matches would read as empty output and pass unnoticed.
    outputs = fake_inventory.fact_outputs(fake_inventory.load_profile(PROFILES / "ubuntu2404-5090d.yaml"))
    fact_classes = facts._ParsedFact.__subclasses__()
    assert len(fact_classes) >= 9
    for fact_class in fact_classes:
        fact = fact_class()
        command = fact.command("/var/lib/gpufleet") if fact_class is facts.FreeDisk else fact.command()
        matching = [key for key in outputs if key in command]
        assert len(matching) == 1, f"{fact_class.__name__}: {matching}; give it one key in fake_inventory.fact_outputs"


@pytest.mark.parametrize("profile", sorted(EXPECTED_PLAN))
def test_full_deploy_plans_the_expected_operations(profile):
    if not (PROFILES / f"{profile}.yaml").is_file():
        pytest.fail(f"EXPECTED_PLAN names {profile}, which has no tests/plan/profiles/{profile}.yaml")
    host = f"@fake/{profile}"
    expected = [entry.format(host=host) for entry in EXPECTED_PLAN[profile]]
    names = planned(profile)
    assert len(names) == len(expected), "\n".join(names)
    for name, start in zip(names, expected):
        assert name.startswith(start), f"planned {name!r}\nexpected it to start with {start!r}"


@pytest.mark.parametrize("profile", sorted(EXPECTED_PLAN))
def test_preflight_refuses_exactly_the_hosts_that_cannot_be_provisioned(profile):
    names = planned(profile)
    assert names, f"nothing planned for {profile}"
    refused_by_preflight = names[0].startswith(f"{PREFLIGHT} | Refuse @fake/{profile}: ")
    assert refused_by_preflight is (profile not in PREFLIGHT_PASSES), names[0]
    if refused_by_preflight:
        assert len(names) == 1, "a host refused by preflight gets nothing else planned"


def test_whole_fleet_plans_each_host_apart():
    result = run_pyinfra("-y", "--dry", "--json", INVENTORY, "deploys/full.py")
    assert result.returncode == 0, result.stderr
    names = [name for operation in json.loads(result.stdout)["plan"] for name in operation["names"]]
    for profile in EXPECTED_PLAN:
        own = [n for n in names if f"@fake/{profile}:" in n]
        assert own == [n for n in planned(profile) if f"@fake/{profile}:" in n], profile


def test_garbage_fact_output_fails_that_host_only(tmp_path):
    shutil.copy(PROFILES / "ubuntu2404-5090d.yaml", tmp_path / "healthy.yaml")
    garbled = (PROFILES / "ubuntu2404-5090d.yaml").read_text().replace(
        "os_release: {captured: ubuntu2404-os-release.txt}", 'os_release: "<html>404 Not Found</html>"'
    )
    assert "<html>" in garbled
    (tmp_path / "garbled.yaml").write_text(garbled)
    result = run_pyinfra(
        "-y", "--dry", "--json", INVENTORY, "deploys/full.py", env={"GPUFLEET_PLAN_PROFILES": str(tmp_path)}
    )
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert any("[@fake/garbled]" in line and "could not process fact: gpufleet.facts.OsInfo" in line for line in lines)
    assert not any("[@fake/healthy]" in line and "Error" in line for line in lines)
    names = [name for operation in json.loads(result.stdout)["plan"] for name in operation["names"]]
    healthy_start = refusal(DRIVER, NOT_YET).format(host="@fake/healthy")
    assert any(name.startswith(healthy_start) for name in names), names



def test_preflight_measures_free_disk_under_venv_path_too():
    result = run_pyinfra(
        "-y", "--dry", "--json", "--debug", "--limit", "@fake/ubuntu2404-5090d", INVENTORY, "deploys/preflight.py"
    )
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stderr.splitlines() if "[fake] simulating command" in line]
    assert any("df -Pk" in c and "p=/var/lib/gpufleet;" in c for c in commands), "the work_dir probe ran"
    assert any("df -Pk" in c and "p=/opt/gpufleet/venv;" in c for c in commands)
