"""Test-only pyinfra inventory: one `@fake/<profile>` host per tests/plan/profiles/*.yaml.

Each profile holds what the host's tools print; this file turns that into the stdout of each gpufleet fact command,
for pyinfra's fake connector (`fake_responses`: command substring -> stdout). Run from the repository root:
    pyinfra -y --dry --json tests/plan/fake_inventory.py deploys/full.py
"""

import os
from pathlib import Path

import yaml

from gpufleet.facts import NO_TOOL
from gpufleet.settings import load_settings, validate_value

_HERE = Path(__file__).resolve().parent
# A test may point this at a folder of its own profiles.
_PROFILES = Path(os.environ.get("GPUFLEET_PLAN_PROFILES", _HERE / "profiles"))
_CAPTURED = _HERE.parent / "data" / "captured"

# Every profile must say each of these; a missing one would silently read as "empty output".
_KEYS = (
    "description", "group", "settings", "os_release", "kernel_release", "wsl_nvidia_smi", "lspci", "nvidia_smi",
    "driver", "meminfo", "cpus", "df", "mokutil", "kernel_headers",
)
_DRIVER_KEYS = ("proc", "modinfo", "dpkg", "runfile")


def _text(value) -> str:
    """A literal text, or {captured: NAME} for a file of tests/data/captured."""
    if isinstance(value, dict):
        return (_CAPTURED / value["captured"]).read_text()
    return value or ""


def fact_outputs(profile: dict) -> dict[str, str]:
    """Command substring of each gpufleet fact -> the stdout its shell command would print on this host."""
    lspci = profile["lspci"]
    pci = NO_TOOL if lspci is None else "\n".join(
        line for line in _text(lspci).splitlines() if "[10de:" in line.lower()
    )
    smi = profile["nvidia_smi"]
    smi_out = NO_TOOL if smi is None else f"{_text(smi['stdout'])}\nrc={smi['rc']}"
    driver = profile["driver"]
    mokutil = profile["mokutil"]
    kernel = _text(profile["kernel_release"]).strip()
    return {
        "cat /etc/os-release": _text(profile["os_release"]),
        "/proc/sys/kernel/osrelease": f"{kernel}\nsmi={'yes' if profile['wsl_nvidia_smi'] else 'no'}",
        "lspci -nn": pci,
        "--query-gpu=": smi_out,
        "/proc/driver/nvidia/version": (
            f"== proc\n{_text(driver['proc'])}\n== modinfo\n{driver['modinfo'] or ''}\n"
            f"== dpkg\n{_text(driver['dpkg'])}\n== runfile\n{'yes' if driver['runfile'] else 'no'}"
        ),
        "/proc/meminfo": f"{_text(profile['meminfo'])}\ncpus={profile['cpus']}",
        "df -Pk": _text(profile["df"]),
        "mokutil": NO_TOOL if mokutil is None else _text(mokutil),
        "/lib/modules/": f"{kernel}\n{'yes' if profile['kernel_headers'] else 'no'}",
    }


def load_profile(path: Path) -> dict:
    profile = yaml.safe_load(path.read_text())
    missing = [k for k in _KEYS if k not in profile] + [
        f"driver.{k}" for k in _DRIVER_KEYS if k not in (profile.get("driver") or {})
    ]
    if missing:
        raise ValueError(f"{path}: profile lacks {', '.join(missing)}")
    schema = load_settings()
    for name, value in profile["settings"].items():
        if name not in schema:
            raise ValueError(f"{path}: unknown setting {name}")
        expected = validate_value(name, value, schema)
        if expected:
            raise ValueError(f"{path}: setting {name}: got {value!r}; expected {expected}")
    return profile


def _host(path: Path, profile: dict) -> tuple[str, dict]:
    data = {
        **profile["settings"],
        "gpufleet_group": profile["group"],
        "fake_responses": fact_outputs(profile),
        "fake_delay": 0,
        "fake_delay_jitter": 0,
    }
    return f"@fake/{path.stem}", data


_profiles = {path: load_profile(path) for path in sorted(_PROFILES.glob("*.yaml"))}

# One pyinfra group per gpufleet group, so group_data/wsl.py applies to the WSL profiles.
workstations = [_host(path, p) for path, p in _profiles.items() if p["group"] == "workstations"]
wsl = [_host(path, p) for path, p in _profiles.items() if p["group"] == "wsl"]
