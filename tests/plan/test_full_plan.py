"""What `pyinfra deploys/full.py` plans for each host profile, through pyinfra's fake connector (nothing is contacted).

Each profile in tests/plan/profiles/ is one host; EXPECTED_PLAN says, in order, the operations pyinfra must plan for it
and whether each changes the host. The plan is pyinfra's own change detection (`--dry --json` without `-y`): every
operation's commands are generated against the profile's facts, as on a user's first interactive run.
"""

from __future__ import annotations

import json
import re
import shutil
from functools import cache
from pathlib import Path

import pytest
import yaml
from pyinfra.api import FactBase

from gpufleet import facts
from tests.conftest import REPO_ROOT, run_pyinfra
from tests.plan import fake_inventory

PROFILES = Path(__file__).resolve().parent / "profiles"
INVENTORY = "tests/plan/fake_inventory.py"

# Deploy names, as the plan prefixes them to each operation name ("<deploy> | <operation>").
PREFLIGHT = "Preflight"
DRIVER = "NVIDIA driver"
CUDA = "CUDA toolkit"
PYTHON = "Python venv"
TORCH = "PyTorch"
XFORMERS = "xformers"
SMOKE = "Smoke test"
# Any stage: for a refusal whose right place is "before any change", whichever stage the fix puts it in.
ANY = "*"

# How an operation touches the host: it changes it, it may (an `_if` decided at run time), or it is already in place.
CHANGE, MAYBE, SAME = "+", "?", "="


def op(mark: str, deploy: str, name: str) -> str:
    return f"{mark} {deploy} | {name}"


def refusal(deploy: str, reason: str) -> str:
    """A refusal names the host and starts with its first reason; `{host}` is filled in per profile."""
    return op(CHANGE, deploy, f"Refuse {{host}}: {reason}")


REPO_URL = "https://developer.download.nvidia.com/compute/cuda/repos"
XFORMERS_SDIST = (
    "https://files.pythonhosted.org/packages/de/5a/6e27734bd793adc44d0b8d294e67cfacf4ec590572c1aef51d683fc7a791/"
    "xformers-0.0.35.tar.gz"
)
APT_LOCK_TIMEOUT = "Make apt wait for package locks held by other processes"
FINISH_INTERRUPTED = "Finish the package installation a dropped connection interrupted"


def nvidia_repo(deploy: str, repo_dir: str = "ubuntu2404", *, apt_settings: bool = True,
                repair: bool = False) -> list[str]:
    """NVIDIA's apt repository, once per host: the keyring package checked by sha256, its keyring, a signed-by
    source. The apt lock timeout comes first unless an earlier stage already wrote it, then (repair) the dpkg work
    a dropped connection left unfinished."""
    return [
        *([op(CHANGE, deploy, APT_LOCK_TIMEOUT)] if apt_settings else []),
        *([op(CHANGE, deploy, FINISH_INTERRUPTED)] if repair else []),
        op(CHANGE, deploy, "Create root's download directory /var/lib/gpufleet-root/downloads"),
        op(CHANGE, deploy, f"Download {REPO_URL}/{repo_dir}/x86_64/cuda-keyring_1.1-1_all.deb (sha256 checked)"),
        op(MAYBE, deploy, "Install NVIDIA's repository keyring"),
        op(CHANGE, deploy, "Add NVIDIA's CUDA repository"),
        op(MAYBE, deploy, "Update apt lists for NVIDIA's repository"),
    ]


NO_DRIVER_FROM_NVIDIA = (
    "Never take driver packages from NVIDIA's repository (developer.download.nvidia.com) on an Ubuntu-driver host"
)
# Ubuntu's archive: the pin against NVIDIA's driver packages comes before the driver is installed, since a host may
# already list NVIDIA's repository (a CUDA installed by hand), whose newer nvidia-driver-580-open would win.
UBUNTU_ARCHIVE = [
    op(CHANGE, DRIVER, APT_LOCK_TIMEOUT),
    op(CHANGE, DRIVER, NO_DRIVER_FROM_NVIDIA),
    op(CHANGE, DRIVER, "Refresh apt lists for Ubuntu's driver packages"),
]


def every_kernel(kernel: str = "6.8.0-88-generic", build: bool = True) -> list[str]:
    """DKMS: the headers metapackage of the running kernel's flavour, and the module built where it is missing."""
    return [
        op(CHANGE, DRIVER, f"Install the kernel headers metapackage (linux-headers-{kernel.split('-', 2)[2]})"),
        *([op(CHANGE, DRIVER, f"Build the NVIDIA module for kernel {kernel} (dkms autoinstall)")] if build else []),
    ]


def driver(packages: str, *, source: list[str] | None = None, headers: str = SAME, installed: str = CHANGE,
           reboot: list[str] | None = None, before_install: list[str] = (),
           kernel: str = "6.8.0-88-generic", after_install: list[str] | None = None) -> list[str]:
    """The driver stage of a bare-metal host: NVIDIA's repo (or fresh lists of Ubuntu's archive), headers, nouveau,
    driver, the module for every kernel, hold, reboot (or stop), and only then the persistence daemon, which needs the
    new module loaded. `after_install` default: DKMS's steps, the module built when the driver is installed now."""
    return [
        op(CHANGE, DRIVER, "Keep unattended-upgrades away from the driver and CUDA"),
        *(source if source is not None else nvidia_repo(DRIVER)),
        op(headers, DRIVER, f"Install kernel headers for DKMS (linux-headers-{kernel})"),
        op(CHANGE, DRIVER, "Blacklist nouveau"),
        op(MAYBE, DRIVER, "Rebuild the initramfs without nouveau"),
        *before_install,
        op(installed, DRIVER, f"Install the NVIDIA driver ({packages})"),
        *(after_install if after_install is not None else every_kernel(kernel, build=installed == CHANGE)),
        op(MAYBE, DRIVER, "Hold the NVIDIA driver packages"),
        *(reboot if reboot is not None else [op(MAYBE, DRIVER, "Reboot: the NVIDIA driver was installed or changed")]),
        op(CHANGE, DRIVER, "Enable the NVIDIA persistence daemon"),
    ]


def cuda_toolkit(repo: list[str] = (), installed: str = CHANGE) -> list[str]:
    """The toolkit alone, never `cuda`, `cuda-12-8` or `cuda-drivers`; `repo`: what the driver stage did not set up."""
    return [
        *repo,
        op(installed, CUDA, "Install the CUDA 12.8 toolkit (cuda-toolkit-12-8)"),
        op(MAYBE, CUDA, "Check that nvcc reports CUDA 12.8"),
        op(CHANGE, CUDA, "Put CUDA 12.8 on PATH for login shells"),
    ]


# With Ubuntu's driver, NVIDIA's repository serves the toolkit only (its driver packages are pinned away already).
CUDA_BESIDE_UBUNTU_DRIVER = cuda_toolkit(nvidia_repo(CUDA, apt_settings=False))
# WSL2: the driver stage sets up nothing from NVIDIA's repository, so the CUDA stage does (wsl-ubuntu).
CUDA_ON_WSL = cuda_toolkit(nvidia_repo(CUDA, "wsl-ubuntu"))
FRESH_VENV = [
    op(CHANGE, PYTHON, "Create the unprivileged build user gpufleet"),
    op(CHANGE, PYTHON, "Create /var/lib/gpufleet"),
    op(CHANGE, PYTHON, "Install Python's venv module"),
    op(CHANGE, PYTHON, "Create /opt/gpufleet"),
    op(CHANGE, PYTHON, "Create /opt/gpufleet/venv for gpufleet"),
    # Planned only because the venv is missing (VenvState), so it is no longer gated.
    op(CHANGE, PYTHON, "Create the venv /opt/gpufleet/venv"),
    op(SAME, PYTHON, "Use PyPI in the venv (no mirror set)"),
    op(CHANGE, PYTHON, "Install pip, wheel, setuptools, ninja in the venv"),
]
PINNED_TORCH = [
    op(CHANGE, TORCH, "Install torch 2.12.0.dev20260407+cu128"),
    op(MAYBE, TORCH, "Check torch's CUDA version and GPU architectures (12.0)"),
]


def xformers_build(archs: str, jobs: int, tools: str | None, source: str = XFORMERS_SDIST) -> list[str]:
    """This host builds the fleet's wheel (it is the only one in a --limit run) and fetches it back; its own upload
    is planned too, in the same place as on every host, and gated off on the builder; then it installs the wheel."""
    return [
        op(CHANGE, XFORMERS, "Create /var/lib/gpufleet/xformers"),
        op(CHANGE, XFORMERS, "Upload cubins.py"),
        *([op(CHANGE, XFORMERS, f"Install the build tools ({tools})")] if tools else []),
        op(CHANGE, XFORMERS, f"Download {source} (sha256 checked)"),
        op(CHANGE, XFORMERS, "Upload the patch series"),
        op(CHANGE, XFORMERS, "Upload build_wheel.sh"),
        op(MAYBE, XFORMERS, f"Build xformers for {archs} with {jobs} jobs (log: /var/lib/gpufleet/xformers/"),
        op(MAYBE, XFORMERS, "Fetch the built wheel to this machine's cache"),
        op(MAYBE, XFORMERS, "Upload the xformers wheel built by {host}"),
        op(CHANGE, XFORMERS, "Install xformers 0.0.35 ("),
        op(MAYBE, XFORMERS, "Record that xformers "),
    ]


SMOKE_TEST = [
    op(CHANGE, SMOKE, "Create the smoke test directory"),
    op(CHANGE, SMOKE, "Upload the smoke test"),
    op(MAYBE, SMOKE, "Run the smoke test on this host's GPU"),
    op(MAYBE, SMOKE, "Copy the smoke result into root's directory (read as the build user)"),
    op(CHANGE, SMOKE, "Fetch the smoke result to the control machine"),
    op(MAYBE, SMOKE, "Keep the smoke result in the report history"),
    op(MAYBE, SMOKE, "Check that every rung of the smoke test passed"),
]
# Everything from venv to smoke test on a fresh host with a 5090 D (7 jobs: this VM's 21 GB available / 3 GB per job).
FRESH_AFTER_CUDA = [*FRESH_VENV, *PINNED_TORCH, *xformers_build("12.0", 7, "g++, make, python3.12-dev"), *SMOKE_TEST]
FRESH_AFTER_DRIVER = [*cuda_toolkit(), *FRESH_AFTER_CUDA]
DEBIAN_AFTER_DRIVER = [
    *cuda_toolkit(), *FRESH_VENV, *PINNED_TORCH, *xformers_build("12.0", 7, "g++, make, python3.11-dev"), *SMOKE_TEST,
]
STOP_FOR_REBOOT = [op(MAYBE, DRIVER, "Stop {host}: reboot needed")]


def checksum_refusal(repo_dir: str) -> str:
    """Preflight refuses a repository without a pinned keyring checksum, saying where to download the keyring."""
    return refusal(
        PREFLIGHT,
        f"setting cuda_keyring_sha256 has no checksum for NVIDIA's '{repo_dir}' repository; download "
        f"{REPO_URL}/{repo_dir}/x86_64/cuda-keyring_1.1-1_all.deb, verify it, and add it to the inventory: "
        f"cuda_keyring_sha256: {{{{{repo_dir}: <sha256>, ...}}}}",
    )


# Profile -> the operations planned for it, in order. Each entry is "<+|?|=> <deploy> | <start of the name>".
EXPECTED_PLAN: dict[str, list[str]] = {
    "ubuntu2404-5090d": [*driver("nvidia-open-580"), *FRESH_AFTER_DRIVER],
    "driver-branch-590": [
        *driver("nvidia-driver-pinning-590, nvidia-open", headers=CHANGE), *FRESH_AFTER_DRIVER,
    ],
    # Ubuntu's signed modules: the only way with Secure Boot on and no MOK; NVIDIA's repository for the toolkit only.
    "driver-source-ubuntu-secure-boot": [
        *driver("nvidia-driver-580-open, linux-modules-nvidia-580-open-generic", source=UBUNTU_ARCHIVE,
                after_install=[op(CHANGE, DRIVER, "Install Ubuntu's signed NVIDIA modules for every kernel "
                                  "(linux-modules-nvidia-580-open-6.8.0-88-generic)")]),
        *CUDA_BESIDE_UBUNTU_DRIVER,
        *FRESH_AFTER_CUDA,
    ],
    # dpkg's unfinished work is finished before apt is asked for anything, once.
    # The repair is planned by deploys/full.py itself, right after preflight, before any stage.
    "interrupted-package-install": [
        f"{CHANGE} {FINISH_INTERRUPTED}",
        *driver("nvidia-open-580", source=nvidia_repo(DRIVER),
                reboot=STOP_FOR_REBOOT),
        *FRESH_AFTER_DRIVER,
    ],
    "driver-branch-upgrade-held": [
        *driver(
            "nvidia-driver-pinning-590, nvidia-open",
            before_install=[
                op(CHANGE, DRIVER,
                   "Refresh apt lists for the new driver branch (nvidia-driver-pinning-590, nvidia-open)"),
                op(CHANGE, DRIVER, "Release the holds of the previous driver "
                   "(libnvidia-compute-580, nvidia-driver-580-open, nvidia-open-580)"),
            ],
        ),
        *FRESH_AFTER_DRIVER,
    ],
    # The machine running pyinfra is never rebooted by it: it stops with instructions when the driver changed.
    "control-machine-5090d": [*driver("nvidia-open-580", reboot=STOP_FOR_REBOOT), *FRESH_AFTER_DRIVER],
    "mismatch-reboot-auto": [
        *driver(
            "nvidia-open-580",
            installed=SAME,
            reboot=[op(MAYBE, DRIVER, "Reboot: the loaded NVIDIA module is 580.82.07 but 580.95.05 is installed")],
        ),
        *FRESH_AFTER_DRIVER,
    ],
    # A busy host (GPU compute process, user logged in) is not rebooted: it stops as "reboot pending".
    "mismatch-reboot-auto-busy": [
        *driver("nvidia-open-580", installed=SAME,
                reboot=[op(MAYBE, DRIVER, "Stop @fake/mismatch-reboot-auto-busy: reboot pending")]),
        *FRESH_AFTER_DRIVER,
    ],
    "mismatch-reboot-when-busy": [
        *driver(
            "nvidia-open-580",
            installed=SAME,
            reboot=[op(MAYBE, DRIVER, "Reboot: the loaded NVIDIA module is 580.82.07 but 580.95.05 is installed")],
        ),
        *FRESH_AFTER_DRIVER,
    ],
    # Ubuntu's archive, 580 -> 595: fresh lists, old holds released, Ubuntu's versioned names for the new branch.
    "driver-branch-595-ubuntu-held": [
        *driver(
            "nvidia-driver-595-open, linux-modules-nvidia-595-open-generic",
            source=UBUNTU_ARCHIVE,
            after_install=[op(CHANGE, DRIVER, "Install Ubuntu's signed NVIDIA modules for every kernel "
                              "(linux-modules-nvidia-595-open-6.8.0-88-generic)")],
            before_install=[
                op(CHANGE, DRIVER, "Refresh apt lists for the new driver branch (nvidia-driver-595-open, "
                   "linux-modules-nvidia-595-open-generic)"),
                op(CHANGE, DRIVER, "Release the holds of the previous driver (libnvidia-compute-580, "
                   "linux-modules-nvidia-580-open-generic, nvidia-driver-580-open)"),
            ],
        ),
        *CUDA_BESIDE_UBUNTU_DRIVER,
        *FRESH_AFTER_CUDA,
    ],
    "mismatch-reboot-never": [*driver("nvidia-open-580", installed=SAME, reboot=STOP_FOR_REBOOT), *FRESH_AFTER_DRIVER],
    # WSL2: no driver package, no nouveau, no hold, no reboot; only Windows' nvidia-smi on PATH.
    "wsl2-ubuntu2404-keyring-pinned": [
        op(CHANGE, DRIVER, "Put Windows' nvidia-smi on PATH"), *CUDA_ON_WSL, *FRESH_AFTER_CUDA,
    ],
    # A missing keyring checksum is known before anything runs: preflight refuses before any change.
    "wsl2-ubuntu2404": [checksum_refusal("wsl-ubuntu")],
    # The build's jobs come from the VM's /proc/meminfo (8 GB by .wslconfig), not from the Windows PC's 64 GB.
    "wsl2-ubuntu2404-8gb-vm": [
        op(CHANGE, DRIVER, "Put Windows' nvidia-smi on PATH"), *CUDA_ON_WSL, *FRESH_VENV, *PINNED_TORCH,
        *xformers_build("12.0", 2, "g++, make, python3.12-dev"), *SMOKE_TEST,
    ],
    # A Windows driver too old for CUDA 12.8 is fixed on Windows: refused before anything inside WSL changes.
    "wsl2-old-windows-driver": [
        refusal(PREFLIGHT, "the Windows NVIDIA driver is 566.36 and CUDA 12.8 needs 570.65 or newer; update the "
                "NVIDIA driver on Windows"),
    ],
    "debian12-5090d": [checksum_refusal("debian12")],
    # Debian 12: its own kernel's headers, NVIDIA's debian12 repository, Debian's Python 3.11 and its -dev package.
    "debian12-5090d-keyring-pinned": [
        *driver("nvidia-open-580", kernel="6.1.0-28-amd64", source=nvidia_repo(DRIVER, "debian12")),
        *DEBIAN_AFTER_DRIVER,
    ],
    # A second run after a successful one: every package "=", the holds kept, torch and xformers plan nothing, every
    # command gated. Files, directories, the user and the daemon show "+" only because the profile does not answer
    # pyinfra's own file and systemd facts (it answers the venv directory, whose owner it states).
    "ubuntu2404-5090d-provisioned": [
        *driver("nvidia-open-580", installed=SAME,
                after_install=[op(SAME, DRIVER, "Install the kernel headers metapackage (linux-headers-generic)")]),
        *cuda_toolkit(installed=SAME),
        op(CHANGE, PYTHON, "Create the unprivileged build user gpufleet"),
        op(CHANGE, PYTHON, "Create /var/lib/gpufleet"),
        # python3-venv is installed: no install (and no list refresh) is planned at all.
        op(CHANGE, PYTHON, "Create /opt/gpufleet"),
        # The venv's owner is read with pyinfra's Directory fact, so the existing venv directory is in place.
        op(SAME, PYTHON, "Create /opt/gpufleet/venv for gpufleet"),
        # The venv has pip (VenvState "ok"): not planned at all.
        op(SAME, PYTHON, "Use PyPI in the venv (no mirror set)"),
        op(SAME, PYTHON, "Install pip, wheel, setuptools, ninja in the venv"),
        *SMOKE_TEST,
    ],
    # A new kernel without headers on a converged host: headers and its module, before any reboot; no reboot.
    "kernel-update-without-headers": [
        *driver("nvidia-open-580", installed=SAME, after_install=[
            *every_kernel(build=False),
            op(CHANGE, DRIVER, "Install the headers of every installed kernel (6.8.0-90-generic)"),
            op(CHANGE, DRIVER, "Build the NVIDIA module for kernel 6.8.0-90-generic (dkms autoinstall)"),
        ]),
        *cuda_toolkit(installed=SAME),
        op(CHANGE, PYTHON, "Create the unprivileged build user gpufleet"),
        op(CHANGE, PYTHON, "Create /var/lib/gpufleet"),
        # python3-venv is installed: no install (and no list refresh) is planned at all.
        op(CHANGE, PYTHON, "Create /opt/gpufleet"),
        op(SAME, PYTHON, "Create /opt/gpufleet/venv for gpufleet"),
        op(SAME, PYTHON, "Use PyPI in the venv (no mirror set)"),
        op(SAME, PYTHON, "Install pip, wheel, setuptools, ninja in the venv"),
        *SMOKE_TEST,
    ],
    # Ubuntu's signed modules follow the running kernel's flavour: HWE's, not generic's.
    "driver-source-ubuntu-hwe": [
        *driver("nvidia-driver-580-open, linux-modules-nvidia-580-open-generic-hwe-24.04", source=UBUNTU_ARCHIVE,
                kernel="6.14.0-36-generic",
                after_install=[op(CHANGE, DRIVER, "Install Ubuntu's signed NVIDIA modules for every kernel "
                                  "(linux-modules-nvidia-580-open-6.14.0-36-generic)")]),
        *CUDA_BESIDE_UBUNTU_DRIVER,
        *FRESH_AFTER_CUDA,
    ],
    # Preprovisioned: driver, toolkit (by its nvcc), venv and torch accepted; only what is missing is added.
    "h100-preprovisioned": [
        op(CHANGE, DRIVER, "Keep unattended-upgrades away from the driver and CUDA"),
        op(CHANGE, CUDA, "Put CUDA 13.0 on PATH for login shells"),
        op(CHANGE, PYTHON, "Create the unprivileged build user gpufleet"),
        op(CHANGE, PYTHON, "Create /var/lib/gpufleet"),
        op(CHANGE, PYTHON, "Point the venv's pip at the configured index"),
        op(CHANGE, PYTHON, "Install pip, wheel, setuptools, ninja in the venv"),
        # torch accepted by importing it; root records that state so the next run need not import it again.
        op(CHANGE, TORCH, "Record the validated torch (its files, interpreter, GPUs and driver)"),
        *xformers_build("9.0, 12.0", 16, None, source="file:///srv/gpufleet-mirror/xformers-0.0.35.tar.gz"),
        *SMOKE_TEST,
    ],
    "ubuntu2404-5090dv2": [
        refusal(PREFLIGHT, "setting driver_branch '575' does not know the NVIDIA GeForce RTX 5090 D v2 [10de:2b8c]"),
    ],
    "debian12-python312-no-interpreter": [
        refusal(
            PREFLIGHT,
            "setting python_version is '3.12' but Debian 12's Python is 3.11; set python_version: \"3.11\", or "
            "python_interpreter to a Python 3.12",
        ),
    ],
    "no-gpu": [refusal(PREFLIGHT, "has no NVIDIA GPU (the PCI bus shows none)")],
    "proprietary-module-on-5090": [
        refusal(PREFLIGHT, "the proprietary NVIDIA kernel module 580.95.05 is loaded, and Blackwell GPUs need the open"),
    ],
    "secure-boot-on": [
        refusal(
            PREFLIGHT,
            "Secure Boot is on, and NVIDIA's repository builds unsigned DKMS modules that will not load. Either set "
            "driver_source: ubuntu (Ubuntu's signed precompiled modules), or enrol a MOK key",
        ),
    ],
}

# Profiles whose plan is wrong today: the deploy bug, as reported. strict: a fix makes the test fail until removed here.
KNOWN_BUGS: dict[str, str] = {}

# Hosts that preflight must let through, whatever the later stages do.
PREFLIGHT_PASSES = {
    "ubuntu2404-5090d", "driver-branch-590", "driver-source-ubuntu-secure-boot", "driver-branch-upgrade-held",
    "control-machine-5090d", "mismatch-reboot-auto", "mismatch-reboot-never", "wsl2-ubuntu2404-keyring-pinned",
    "h100-preprovisioned", "debian12-5090d-keyring-pinned", "ubuntu2404-5090d-provisioned",
    "interrupted-package-install", "wsl2-ubuntu2404-8gb-vm", "mismatch-reboot-auto-busy", "mismatch-reboot-when-busy",
    "driver-branch-595-ubuntu-held", "kernel-update-without-headers", "driver-source-ubuntu-hwe",
}


def profile_names() -> list[str]:
    return sorted(path.stem for path in PROFILES.glob("*.yaml"))


def plan_json(*args: str, profiles: Path | None = None) -> dict:
    env = {"GPUFLEET_PLAN_PROFILES": str(profiles)} if profiles else None
    result = run_pyinfra("--dry", "--json", *args, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def mark(operation: dict) -> str:
    if operation["hosts_with_change"]:
        return CHANGE
    return MAYBE if operation["hosts_with_conditional_change"] else SAME


@cache
def planned(profile: str, deploy_file: str = "deploys/full.py") -> tuple[str, ...]:
    """`<mark> <name>` of each operation pyinfra plans for one profile's host (`--limit`: that host alone)."""
    names = []
    for operation in plan_json("--limit", f"@fake/{profile}", INVENTORY, deploy_file)["plan"]:
        assert len(operation["names"]) == 1, operation
        names.append(f"{mark(operation)} {operation['names'][0]}")
    return tuple(names)


def matches(name: str, expected: str) -> bool:
    if expected[2:].startswith(f"{ANY} | "):
        return name[:2] == expected[:2] and name.partition(" | ")[2].startswith(expected.partition(" | ")[2])
    return name.startswith(expected)


def names_only(profile: str) -> list[str]:
    return [name[2:] for name in planned(profile)]


def test_every_profile_has_an_expected_plan_and_every_plan_a_profile():
    assert profile_names() == sorted(EXPECTED_PLAN), "add the profile to EXPECTED_PLAN, or its YAML to profiles/"
    assert PREFLIGHT_PASSES <= set(EXPECTED_PLAN)
    assert set(KNOWN_BUGS) <= set(EXPECTED_PLAN)


def test_every_profile_gives_every_output_and_valid_settings():
    for path in sorted(PROFILES.glob("*.yaml")):
        fake_inventory.load_profile(path)


def test_a_profile_without_a_required_output_is_rejected(tmp_path):
    text = (PROFILES / "ubuntu2404-5090d.yaml").read_text().replace("held: \"\"", "")
    (tmp_path / "incomplete.yaml").write_text(text)
    with pytest.raises(ValueError, match="profile lacks held"):
        fake_inventory.load_profile(tmp_path / "incomplete.yaml")


# The arguments the deploys pass to each gpufleet fact (default settings; the H100 profile's paths below).
FACT_CALLS: dict[str, list[dict]] = {
    "OsInfo": [{}],
    "WslInfo": [{}],
    "NvidiaPciGpus": [{}],
    "NvidiaSmi": [{}],
    "DriverStateFact": [{}],
    "MemoryInfo": [{}],
    "FreeDisk": [{"path": "/var/lib/gpufleet"}, {"path": "/opt/gpufleet/venv"}],
    "SecureBoot": [{}],
    "KernelHeaders": [{}],
    "HeldPackages": [{}],
    "MissingTools": [{}, {"tools": ("g++", "make", "patch")}, {"tools": ("g++", "make", "patch", "ccache")}],
    "NvccVersion": [{"cuda_home": "/usr/local/cuda-12.8"}, {"cuda_home": "/usr/local/cuda-13.0"}],
    "PythonVersion": [{"python": "/usr/bin/python3"}, {"python": "/opt/gpufleet/venv/bin/python"},
                      {"python": "/opt/torch/.venv/bin/python"}],
    "TorchInfo": [{"python": "/opt/gpufleet/venv/bin/python", "context": "gpus=2b87 driver=580.95.05"},
                  {"python": "/opt/torch/.venv/bin/python", "context": "gpus=2330 driver=580.159.04"}],
    "PythonHeaders": [{"python": "/opt/gpufleet/venv/bin/python"}, {"python": "/opt/torch/.venv/bin/python"}],
    "PipFreeze": [{"python": "/opt/gpufleet/venv/bin/python"}, {"python": "/opt/torch/.venv/bin/python"}],
    "InstalledDistributions": [{"python": "/opt/gpufleet/venv/bin/python"}, {"python": "/opt/torch/.venv/bin/python"}],
    "InterruptedPackageInstall": [{}],
    "Account": [{"user": "gpufleet"}],
    "PlantedLinks": [{"paths": ["/var/lib/gpufleet/xformers/build_wheel.sh"],
                      "trees": ["/var/lib/gpufleet/xformers/patches-0.0.35"]}],
    "GpuBusy": [{}],
    "InstalledKernels": [{}],
    "HostProbe": [{"disk_paths": ("/var/lib/gpufleet", "/opt/gpufleet/venv")}],
    "AptListsPresent": [{"uri": "https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2404/x86_64/"}],
    "InitramfsStale": [{"conf": "/etc/modprobe.d/gpufleet-blacklist-nouveau.conf"}],
    "VenvState": [{"python": "/opt/gpufleet/venv/bin/python"}, {"python": "/opt/torch/.venv/bin/python"}],
    "SystemdServiceState": [{"unit": "apt-cacher-ng.service", "paths": ["/etc/apt-cacher-ng/zz_gpufleet.conf"]},
                            {"unit": "gpufleet-devpi.service", "paths": ["/etc/systemd/system/gpufleet-devpi.service"]}],
    "HasSystemd": [{}],
    "DevpiMirrors": [{"base": "http://127.0.0.1:3141", "indexes": ["root/gpufleet", "root/pypi", "root/pytorch"]}],
    "DevpiIndexFiles": [{"index_url": "http://192.0.2.5:3141/root/gpufleet"}],
}


def gpufleet_facts() -> list[type[FactBase]]:
    """Every pyinfra fact gpufleet/facts.py defines (parsed or not; its private base classes are no facts)."""
    return [
        cls for cls in vars(facts).values()
        if isinstance(cls, type) and issubclass(cls, FactBase) and cls.__module__ == facts.__name__
        and not cls.__name__.startswith("_")
    ]


def test_every_gpufleet_fact_has_realistic_arguments_here():
    # A new fact in gpufleet/facts.py fails here until the profiles answer it.
    assert {cls.__name__ for cls in gpufleet_facts()} == set(FACT_CALLS)


@pytest.mark.parametrize("profile", profile_names())
def test_every_gpufleet_fact_command_is_answered_by_that_fact_s_own_profile_output(profile):
    # The fake connector answers the first key found in the command; an unanswered command would read as empty.
    answers = fake_inventory.fact_answers(fake_inventory.load_profile(PROFILES / f"{profile}.yaml"))
    for fact_class in gpufleet_facts():
        for kwargs in FACT_CALLS[fact_class.__name__]:
            command = fact_class().command(**kwargs)
            answer = next((a for a in answers if a.key in command), None)
            assert answer is not None, f"{fact_class.__name__}({kwargs}): no output in fake_inventory.fact_answers"
            assert answer.fact == fact_class.__name__, f"{fact_class.__name__}({kwargs}) is answered by {answer}"
            fact_class().process(answer.stdout.splitlines())  # FactProcessError: the profile's output is garbage


def test_an_unanswered_tool_list_is_not_read_as_nothing_missing():
    answers = fake_inventory.fact_answers(fake_inventory.load_profile(PROFILES / "ubuntu2404-5090d.yaml"))
    command = facts.MissingTools().command(tools=("cuobjdump",))
    answer = next(a for a in answers if a.key in command)
    assert answer.fact != "MissingTools" and answer.stdout


@pytest.mark.parametrize(
    "profile",
    [
        pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[p])) if p in KNOWN_BUGS else p
        for p in sorted(EXPECTED_PLAN)
    ],
)
def test_full_deploy_plans_the_expected_operations(profile):
    if not (PROFILES / f"{profile}.yaml").is_file():
        pytest.fail(f"EXPECTED_PLAN names {profile}, which has no tests/plan/profiles/{profile}.yaml")
    host = f"@fake/{profile}"
    expected = [entry.format(host=host) for entry in EXPECTED_PLAN[profile]]
    names = planned(profile)
    assert len(names) == len(expected), "\n".join(names)
    for name, start in zip(names, expected):
        assert matches(name, start), f"planned {name!r}\nexpected it to start with {start!r}"


@pytest.mark.parametrize("profile", sorted(EXPECTED_PLAN))
def test_preflight_refuses_exactly_the_hosts_that_cannot_be_provisioned(profile):
    names = planned(profile)
    assert names, f"nothing planned for {profile}"
    refused_by_preflight = names[0].startswith(f"{CHANGE} {PREFLIGHT} | Refuse @fake/{profile}: ")
    assert refused_by_preflight is (profile not in PREFLIGHT_PASSES), names[0]
    if refused_by_preflight:
        assert len(names) == 1, "a host refused by preflight gets nothing else planned"


@pytest.mark.parametrize("profile", sorted(EXPECTED_PLAN))
def test_no_host_gets_a_forbidden_package(profile):
    # Never the proprietary flavour on Blackwell, never the `cuda` metapackages (they pull drivers, break WSL).
    for name in names_only(profile):
        if " | Install " not in name:
            continue
        for forbidden in ("cuda-drivers", "(cuda)", "(cuda-12-8)", "cuda-12-8,", "nvidia-driver-580)"):
            assert forbidden not in name, name


def test_wsl_host_gets_no_driver_no_nouveau_no_hold_and_no_reboot():
    names = names_only("wsl2-ubuntu2404-keyring-pinned")
    assert [n for n in names if n.startswith(f"{DRIVER} | ")] == [f"{DRIVER} | Put Windows' nvidia-smi on PATH"]
    for name in names:
        assert not any(word in name for word in ("nouveau", "Hold", "Reboot", "reboot", "linux-headers")), name


def test_wsl_build_jobs_come_from_the_vm_memory_that_wslconfig_caps():
    # 7.3 GiB available in the VM / 3 GB a job = 2 jobs, although the VM has 16 CPUs (and Windows 64 GB).
    builds = [n for n in names_only("wsl2-ubuntu2404-8gb-vm") if n.startswith(f"{XFORMERS} | Build xformers")]
    assert len(builds) == 1 and " with 2 jobs " in builds[0], builds


def test_wsl_windows_driver_too_old_is_refused_before_any_change_with_the_windows_update_as_the_fix():
    (only,) = names_only("wsl2-old-windows-driver")
    assert only.startswith(f"{PREFLIGHT} | Refuse ")
    assert "update the NVIDIA driver on Windows" in only and "wsl --shutdown" in only


@pytest.mark.parametrize("profile", ["control-machine-5090d", "h100-preprovisioned"])
def test_the_machine_running_pyinfra_is_never_rebooted(profile):
    assert not [n for n in names_only(profile) if "| Reboot" in n]


def test_mismatch_with_reboot_policy_auto_reboots_the_host():
    reboots = [n for n in planned("mismatch-reboot-auto") if "| Reboot: " in n]
    reason = "the loaded NVIDIA module is 580.82.07 but 580.95.05 is installed (nvidia-smi: 'Driver/library version mismatch')"
    assert reboots == [f"{MAYBE} {DRIVER} | Reboot: {reason}"]


def executed(profile: str, deploy_file: str) -> list[str]:
    """Commands (and uploads) a real, non-dry run sends to the fake host, in order: nothing leaves this machine."""
    result = run_pyinfra("-y", "--debug", "--limit", f"@fake/{profile}", INVENTORY, deploy_file)
    assert result.returncode == 0, result.stderr
    marker = "[fake] simulating "
    return [line.split(marker, 1)[1].split(": ", 1)[1] for line in result.stderr.splitlines() if marker in line]


def test_busy_host_is_not_rebooted_and_is_reported_pending_with_its_processes_and_users():
    profile = "mismatch-reboot-auto-busy"
    assert not [n for n in names_only(profile) if "| Reboot" in n]
    stop = [c for c in executed(profile, "deploys/driver.py") if "gpufleet refuses this host" in c]
    assert len(stop) == 1 and stop[0].endswith("exit 1")
    for words in ("reboot pending: the loaded NVIDIA module is 580.82.07 but 580.95.05 is installed",
                  "GPU compute processes: python3 (pid 4242)", "users logged in: alice", "reboot_when_busy: true"):
        assert words in stop[0], words


def test_reboot_when_busy_reboots_a_busy_host():
    assert [n for n in names_only("mismatch-reboot-when-busy") if "| Reboot: " in n]


def test_new_kernel_gets_headers_and_its_module_before_any_reboot_and_reboots_nothing():
    commands = executed("kernel-update-without-headers", "deploys/driver.py")
    headers = next(i for i, c in enumerate(commands) if "apt-get" in c and "install" in c
                   and "linux-headers-6.8.0-90-generic" in c)
    build = commands.index("dkms autoinstall -k 6.8.0-90-generic")
    assert headers < build
    assert not [c for c in commands if "reboot" in c], "a kernel update alone reboots nothing"


def test_mismatch_with_reboot_policy_never_stops_with_instructions():
    names = names_only("mismatch-reboot-never")
    assert f"{DRIVER} | Stop @fake/mismatch-reboot-never: reboot needed" in names
    assert not [n for n in names if "| Reboot" in n]
    stop = [c for c in executed("mismatch-reboot-never", "deploys/driver.py") if "gpufleet refuses this host" in c]
    assert len(stop) == 1 and stop[0].endswith("exit 1")
    # What was found, the setting that keeps gpufleet from rebooting, and both ways forward.
    for words in ("580.82.07 but 580.95.05 is installed", "reboot_policy is never", "Reboot the host",
                  "rmmod nvidia_uvm nvidia_drm nvidia_modeset nvidia", "run gpufleet again"):
        assert words in stop[0], words


def test_nvidia_repository_keyring_is_checked_before_use_and_apt_key_is_never_run():
    commands = executed("mismatch-reboot-never", "deploys/driver.py")
    deb = "/var/lib/gpufleet-root/downloads/cuda-keyring_1.1-1_all.deb"
    url = "https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2404/x86_64/cuda-keyring_1.1-1_all.deb"
    download = next(i for i, c in enumerate(commands) if c.startswith(f"curl -sSLf {url} "))
    check = next(i for i, c in enumerate(commands) if f"sha256sum {deb}" in c)
    assert "d2a6b11c096396d868758b86dab1823b25e14d70333f1dfa74da5ddaf6a06dba" in commands[check]
    sha = "d2a6b11c096396d868758b86dab1823b25e14d70333f1dfa74da5ddaf6a06dba"
    # The extracting command checks the sha256 itself: nothing can swap the file between the check and the use.
    keyring = next(i for i, c in enumerate(commands)
                   if c.startswith(f"echo '{sha}  {deb}' | sha256sum -c --quiet && dpkg-deb --fsys-tarfile {deb} "))
    source = commands.index("/etc/apt/sources.list.d/gpufleet-cuda.sources")
    update = commands.index("apt-get update")
    assert download < check < keyring < source < update
    assert not [c for c in commands if "apt-key" in c]


@pytest.mark.parametrize("profile", sorted(PREFLIGHT_PASSES))
def test_nvidia_repository_and_apt_settings_are_planned_once_per_host(profile):
    names = names_only(profile)
    for once in ("cuda-keyring_1.1-1_all.deb (sha256 checked)", "| Update apt lists for NVIDIA's repository",
                 f"| {APT_LOCK_TIMEOUT}", f"| {FINISH_INTERRUPTED}"):
        assert len([n for n in names if n.endswith(once) or once + " " in n]) <= 1, once


def test_a_stale_module_is_rebooted_away_before_the_persistence_daemon_is_started():
    names = names_only("mismatch-reboot-auto")
    reboot = next(i for i, n in enumerate(names) if "| Reboot: " in n)
    daemon = [i for i, n in enumerate(names) if "persistence daemon" in n]
    assert all(i > reboot for i in daemon), names


def test_every_missing_checksum_refusal_says_where_to_download_the_keyring():
    refusals = [n for n in names_only("wsl2-ubuntu2404") if "cuda_keyring_sha256" in n]
    assert refusals
    for name in refusals:
        assert "https://developer.download.nvidia.com/compute/cuda/repos/wsl-ubuntu/x86_64/" in name, name


def test_ubuntu_archive_driver_is_installed_from_fresh_apt_lists():
    names = names_only("driver-source-ubuntu-secure-boot")
    install = names.index(f"{DRIVER} | Install the NVIDIA driver (nvidia-driver-580-open, linux-modules-nvidia-580-open-generic)")
    assert [n for n in names[:install] if "apt lists" in n or "Update apt" in n], names[:install]


def test_interrupted_package_install_is_finished_before_apt_runs():
    commands = executed("interrupted-package-install", "deploys/driver.py")
    repair = commands.index("DEBIAN_FRONTEND=noninteractive dpkg --configure -a")
    assert commands[repair + 1] == "DEBIAN_FRONTEND=noninteractive apt-get -y -f install"
    assert not [c for c in commands[:repair] if c.startswith(("apt-get", "DEBIAN_FRONTEND=", "dpkg -i"))]
    assert FINISH_INTERRUPTED not in " ".join(names_only("ubuntu2404-5090d")), "a healthy host gets no repair"


def test_interrupted_dpkg_is_repaired_on_a_host_whose_stages_use_no_apt(tmp_path):
    # The preprovisioned host installs no package (driver, toolkit and venv accepted), so apt_settings never runs.
    text = (PROFILES / "h100-preprovisioned.yaml").read_text().replace(
        'dpkg_interrupted: ""', "dpkg_interrupted: {captured: dpkg-interrupted-half-configured.txt, rc: 0}")
    (tmp_path / "h100-preprovisioned.yaml").write_text(text)
    plan = plan_json("--limit", "@fake/h100-preprovisioned", INVENTORY, "deploys/full.py", profiles=tmp_path)["plan"]
    names = [operation["names"][0] for operation in plan]
    assert names[0] == FINISH_INTERRUPTED, names
    assert FINISH_INTERRUPTED not in names_only("h100-preprovisioned"), "a clean dpkg gets no repair"


def test_a_driver_installed_but_never_loaded_is_rebooted_with_reboot_policy_auto(tmp_path):
    # A fresh host whose run was killed between the driver install and the reboot: the module is on disk only.
    # (reboot_policy never: tests/lab/test_interruptions.py, where the stop message is read on every run.)
    text = (PROFILES / "mismatch-reboot-auto.yaml").read_text()
    (tmp_path / "not-loaded-auto.yaml").write_text(re.sub(r'(?m)^  proc: "NVRM.*"$', '  proc: ""', text))
    reason = "the NVIDIA module 580.95.05 is installed but not loaded"
    auto = plan_json("--limit", "@fake/not-loaded-auto", INVENTORY, "deploys/full.py", profiles=tmp_path)["plan"]
    assert [op for op in auto if op["names"][0] == f"{DRIVER} | Reboot: {reason} (the host was not rebooted)"], auto


def test_ubuntu_driver_host_pins_nvidia_s_driver_packages_away_before_installing_the_driver():
    names = names_only("driver-source-ubuntu-secure-boot")
    install = next(i for i, n in enumerate(names) if n.startswith(f"{DRIVER} | Install the NVIDIA driver ("))
    assert [n for n in names[:install] if n.endswith(NO_DRIVER_FROM_NVIDIA)], names[:install]


def test_ubuntu_driver_host_pins_nvidia_s_driver_packages_away_before_installing_the_toolkit():
    commands = executed("driver-source-ubuntu-secure-boot", "deploys/cuda.py")
    pin = commands.index("/etc/apt/preferences.d/gpufleet-driver-source")
    toolkit = next(i for i, c in enumerate(commands) if c.endswith(" install cuda-toolkit-12-8"))
    assert pin < toolkit
    # With NVIDIA's own driver the same repository serves both: nothing to pin.
    assert not [n for n in names_only("ubuntu2404-5090d") if "Never take driver packages" in n]


def test_second_run_keeps_the_holds_of_the_installed_driver():
    names = names_only("ubuntu2404-5090d-provisioned")
    assert not [n for n in names if "Release the holds" in n], names


def test_preprovisioned_host_installs_nothing_it_has():
    names = names_only("h100-preprovisioned")
    for present in ("NVIDIA driver (", "kernel headers", "cuda-toolkit", "Install torch", "Create the venv",
                    "Install the build tools", "Reboot", "Stop "):
        assert not [n for n in names if present in n], present


def test_second_run_installs_nothing_and_rebuilds_nothing():
    names = planned("ubuntu2404-5090d-provisioned")
    # Package installs (the keyring is a file, gated on a pyinfra file fact this profile does not answer).
    installs = [n for n in names if " | Install " in n and "keyring" not in n]
    assert installs and all(n.startswith(f"{SAME} ") for n in installs), installs
    assert not [n for n in names if f" {TORCH} | " in n or f" {XFORMERS} | " in n]
    # What runs only when something changed is gated, never unconditional.
    for gated in ("Reboot", "Hold the NVIDIA driver packages", "Rebuild the initramfs", "Create the venv",
                  "Run the smoke test", "Update apt lists"):
        assert all(n.startswith(f"{MAYBE} ") for n in names if gated in n), gated


def test_garbage_fact_output_fails_that_host_only(tmp_path):
    shutil.copy(PROFILES / "ubuntu2404-5090d.yaml", tmp_path / "healthy.yaml")
    garbled = (PROFILES / "ubuntu2404-5090d.yaml").read_text().replace(
        "os_release: {captured: ubuntu2404-os-release.txt}", 'os_release: "<html>404 Not Found</html>"'
    )
    assert "<html>" in garbled
    (tmp_path / "garbled.yaml").write_text(garbled)
    result = run_pyinfra(
        "--dry", "--json", INVENTORY, "deploys/full.py", env={"GPUFLEET_PLAN_PROFILES": str(tmp_path)}
    )
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    # The OS is read with preflight's other probes in one command (HostProbe); the error names the file.
    assert any("[@fake/garbled]" in line and "could not process fact: gpufleet.facts.HostProbe" in line for line in lines)
    assert any("[@fake/garbled]" in line and "no ID= line in /etc/os-release" in line for line in lines)
    assert not any("[@fake/healthy]" in line and "Error" in line for line in lines)
    names = [name for operation in json.loads(result.stdout)["plan"] for name in operation["names"]]
    assert f"{DRIVER} | Install the NVIDIA driver (nvidia-open-580)" in names


def test_a_cached_wheel_is_uploaded_instead_of_built(tmp_path):
    install = next(n for n in names_only("ubuntu2404-5090d") if n.startswith(f"{XFORMERS} | Install xformers"))
    fingerprint = install.split("(")[1].split(")")[0]
    cache = tmp_path / fingerprint
    cache.mkdir()
    (cache / "manifest.json").write_text("{}")
    result = run_pyinfra(
        "--dry", "--json", "--limit", "@fake/ubuntu2404-5090d", INVENTORY, "deploys/full.py",
        env={"GPUFLEET_PLAN_WHEEL_CACHE": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    names = [f"{mark(o)} {o['names'][0]}" for o in json.loads(result.stdout)["plan"] if o["names"][0].startswith(f"{XFORMERS} |")]
    # Nothing to build or fetch: those two stay gated (off on a host that is not the builder), nothing is downloaded.
    assert names == [
        f"{CHANGE} {XFORMERS} | Create /var/lib/gpufleet/xformers",
        f"{CHANGE} {XFORMERS} | Upload cubins.py",
        f"{MAYBE} {XFORMERS} | Build xformers for 12.0 with 7 jobs (log: /var/lib/gpufleet/xformers/wheels/{fingerprint}/build.log)",
        f"{MAYBE} {XFORMERS} | Fetch the built wheel to this machine's cache",
        f"{MAYBE} {XFORMERS} | Upload the xformers wheel built earlier",
        f"{CHANGE} {XFORMERS} | Install xformers 0.0.35 ({fingerprint}) and prove its sm code",
        f"{MAYBE} {XFORMERS} | Record that xformers {fingerprint} is installed",
    ]


def _fleet(tmp_path: Path, *profiles: str) -> Path:
    for name in profiles:
        shutil.copy(PROFILES / f"{name}.yaml", tmp_path / f"{name}.yaml")
    return tmp_path


def test_two_fresh_workstations_plan_together(tmp_path):
    fleet = _fleet(tmp_path, "ubuntu2404-5090d", "driver-branch-590")
    result = run_pyinfra("--dry", "--json", INVENTORY, "deploys/full.py", env={"GPUFLEET_PLAN_PROFILES": str(fleet)})
    assert result.returncode == 0, result.stderr
    names = [name for operation in json.loads(result.stdout)["plan"] for name in operation["names"]]
    assert f"{XFORMERS} | Upload the xformers wheel built by @fake/driver-branch-590" in names


def test_whole_fleet_plans_every_host():
    plan = plan_json(INVENTORY, "deploys/full.py")["plan"]
    names = [name for operation in plan for name in operation["names"]]
    for profile in EXPECTED_PLAN:
        for own in planned(profile):
            if " | Refuse " in own:
                assert own[2:] in names, own


def test_a_refused_host_is_never_the_xformers_builder(tmp_path):
    fleet = _fleet(tmp_path, "debian12-python312-no-interpreter", "ubuntu2404-5090d")
    plan = plan_json(INVENTORY, "deploys/full.py", profiles=fleet)["plan"]
    names = [name for operation in plan for name in operation["names"]]
    assert not [n for n in names if "built by @fake/debian12-python312-no-interpreter" in n]
    assert [n for n in names if n.startswith(f"{XFORMERS} | Build xformers for 12.0")]


def test_the_wheel_is_uploaded_only_after_the_builder_fetched_it(tmp_path):
    fleet = _fleet(tmp_path, "driver-branch-590", "ubuntu2404-5090d")
    plan = plan_json(INVENTORY, "deploys/xformers.py", profiles=fleet)["plan"]
    names = [operation["names"][0] for operation in plan]
    upload = names.index(f"{XFORMERS} | Upload the xformers wheel built by @fake/driver-branch-590")
    assert names.index(f"{XFORMERS} | Fetch the built wheel to this machine's cache") < upload, names


def test_preflight_measures_free_disk_under_venv_path_too():
    result = run_pyinfra(
        "-y", "--dry", "--json", "--debug", "--limit", "@fake/ubuntu2404-5090d", INVENTORY, "deploys/preflight.py"
    )
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stderr.splitlines() if "[fake] simulating command" in line]
    assert any("df -Pk" in c and "p=/var/lib/gpufleet;" in c for c in commands), "the work_dir probe ran"
    assert any("df -Pk" in c and "p=/opt/gpufleet/venv;" in c for c in commands)


def test_pyinfra_runs_this_checkout_s_gpufleet(tmp_path):
    which = tmp_path / "gpufleet-path"
    result = run_pyinfra(
        "--dry", "--json", "--limit", "@fake/no-gpu", INVENTORY, "deploys/preflight.py",
        env={"GPUFLEET_PLAN_WHICH_GPUFLEET": str(which)},
    )
    assert result.returncode == 0, result.stderr
    assert which.read_text() == str(REPO_ROOT / "gpufleet" / "__init__.py")


def test_a_run_keeps_history_only_when_its_smoke_test_runs(tmp_path):
    """The history copy is gated like the test itself and made at run time: planning writes no history folder."""
    result = run_pyinfra("--dry", "--json", "--limit", "@fake/ubuntu2404-5090d-provisioned", INVENTORY,
                         "deploys/smoke.py", env={"GPUFLEET_PLAN_REPORT_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    marks = {o["names"][0]: mark(o) for o in json.loads(result.stdout)["plan"]}
    assert marks[f"{SMOKE} | Keep the smoke result in the report history"] == MAYBE
    assert marks[f"{SMOKE} | Run the smoke test on this host's GPU"] == MAYBE
    assert not (tmp_path / "history").exists()


def test_a_venv_path_someone_else_owns_is_refused_not_chowned(tmp_path):
    profile = yaml.safe_load((PROFILES / "ubuntu2404-5090d-provisioned.yaml").read_text())
    profile["venv"]["owner"] = "alice"
    (tmp_path / "ubuntu2404-5090d-provisioned.yaml").write_text(yaml.safe_dump(profile))
    plan = plan_json(INVENTORY, "deploys/python.py", profiles=tmp_path)["plan"]
    names = [operation["names"][0] for operation in plan]
    assert names == ["Python venv | Refuse @fake/ubuntu2404-5090d-provisioned: setting venv_path is "
                     "/opt/gpufleet/venv, which exists and belongs to alice; gpufleet hands only a directory of its "
                     "own to gpufleet: choose a new path"], names


def test_an_existing_venv_parent_keeps_its_owner_and_mode(tmp_path):
    # /opt (or /srv, someone's home) exists already: gpufleet did not make it and never chmods it.
    def python_stage(profile: dict) -> list[str]:
        fleet = tmp_path / str(len(list(tmp_path.iterdir())))
        fleet.mkdir()
        (fleet / "ubuntu2404-5090d.yaml").write_text(yaml.safe_dump(profile))
        return [o["names"][0] for o in plan_json(INVENTORY, "deploys/python.py", profiles=fleet)["plan"]]

    profile = yaml.safe_load((PROFILES / "ubuntu2404-5090d.yaml").read_text())
    assert "Python venv | Create /opt/gpufleet" in python_stage(profile)
    existing = python_stage({**profile, "directories": ["/opt/gpufleet"]})
    assert "Python venv | Create /opt/gpufleet" not in existing, existing
    assert "Python venv | Create /opt/gpufleet/venv for gpufleet" in existing, existing


@pytest.mark.parametrize("deploy_file, link", [
    ("deploys/smoke.py", "/var/lib/gpufleet/smoke -> /etc/cron.d"),
    ("deploys/xformers.py", "/var/lib/gpufleet/xformers/build_wheel.sh -> /etc/passwd"),
])
def test_a_symlink_the_build_user_planted_refuses_the_host_before_any_change(tmp_path, deploy_file, link):
    profile = yaml.safe_load((PROFILES / "ubuntu2404-5090d-provisioned.yaml").read_text())
    profile["planted_links"] = [link]
    profile["files"] = {}  # xformers not installed yet, so the xformers stage has work to do
    (tmp_path / "ubuntu2404-5090d-provisioned.yaml").write_text(yaml.safe_dump(profile))
    names = [o["names"][0] for o in plan_json(INVENTORY, deploy_file, profiles=tmp_path)["plan"]]
    assert len(names) == 1 and names[0].endswith(
        f"Refuse @fake/ubuntu2404-5090d-provisioned: {link} is a symbolic link in the build user's tree; "
        "gpufleet never follows such a link as root. Remove it (and check who made it), then run again."), names
