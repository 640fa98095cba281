"""Decisions: plain functions of facts and settings, tested without a host."""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from urllib.parse import urlparse

from packaging.version import Version

from gpufleet.buildplan import normalise_arch_list
from gpufleet.facts import DriverState, OsRelease, PciGpu, SmiResult
from gpufleet.layout import SMOKE_SCRIPT

GB = 1024**3


@dataclass(frozen=True)
class GpuModel:
    name: str
    compute_cap: str
    blackwell: bool
    # The first driver that names the card, and branches that never learned it.
    min_driver: str
    unsupported_branches: tuple[str, ...] = ()


# PCI device IDs (vendor 10de) -> model. Source: open-gpu-kernel-modules g_nv_name_released.h (shared FACTS.md).
RTX_5090, RTX_5090_D, RTX_5090_D_V2 = "2b85", "2b87", "2b8c"
GPU_MODELS: dict[str, GpuModel] = {
    RTX_5090: GpuModel("NVIDIA GeForce RTX 5090", "12.0", True, "570.86.16"),
    RTX_5090_D: GpuModel("NVIDIA GeForce RTX 5090 D", "12.0", True, "570.86.16"),
    RTX_5090_D_V2: GpuModel("NVIDIA GeForce RTX 5090 D v2", "12.0", True, "570.190", ("575",)),
    # H100: the first driver is recalled, not checked here; gpufleet only accepts existing drivers on it so far.
    "2330": GpuModel("NVIDIA H100 80GB HBM3", "9.0", False, "525.60.13"),
}

# Which package brings a missing command.
TOOL_PACKAGES = {"apt-get": "apt", "dpkg-query": "dpkg", "tar": "tar", "sha256sum": "coreutils", "su": "util-linux",
                 "curl/wget": "curl"}

DRIVER_PACKAGE_PREFIXES = ("nvidia-", "libnvidia-", "linux-modules-nvidia-")

SUPPORTED_OS = {("ubuntu", "24.04"), ("debian", "12")}

# Lowest driver each CUDA toolkit runs on (12.8: NVIDIA's release notes via secondary sources, unverified).
# 13.0: the first driver NVIDIA shipped with CUDA 13.0 (580.65.06), as recalled, not checked here. Toolkits not listed
# get no driver check.
CUDA_MIN_DRIVER = {"12.8": "570.26", "13.0": "580.65.06"}
# The same for the Windows driver a WSL2 host uses, which has its own numbering (NVIDIA's CUDA release notes, table 3,
# "CUDA 12.8 GA: >=570.65", as copied in public repositories; unverified against NVIDIA's page). From CUDA 13.0 on the
# table lists no Windows driver: not judged.
CUDA_MIN_WINDOWS_DRIVER = {"12.8": "570.65"}
_DRIVER_VERSION = re.compile(r"^\d+\.\d+(\.\d+)?$")


@dataclass(frozen=True)
class HostGpu:
    device_id: str
    name: str
    compute_cap: str | None
    blackwell: bool


def host_gpus(pci: list[PciGpu] | None, smi: SmiResult) -> list[HostGpu]:
    """The host's NVIDIA GPUs: PCI IDs first (they need no driver), nvidia-smi where lspci cannot see (WSL)."""
    found: list[HostGpu] = []
    seen_ids = []
    for gpu in pci or []:
        model = GPU_MODELS.get(gpu.device_id)
        smi_cap = next((g.compute_cap for g in smi.gpus if g.device_id == gpu.device_id), None)
        found.append(
            HostGpu(
                device_id=gpu.device_id,
                name=model.name if model else gpu.description,
                compute_cap=model.compute_cap if model else smi_cap,
                blackwell=model.blackwell if model else (smi_cap or "0").startswith(("10.", "12.")),
            )
        )
        seen_ids.append(gpu.device_id)
    if not found:
        for gpu in smi.gpus:
            model = GPU_MODELS.get(gpu.device_id)
            found.append(
                HostGpu(
                    device_id=gpu.device_id,
                    name=gpu.name,
                    compute_cap=gpu.compute_cap,
                    blackwell=model.blackwell if model else gpu.compute_cap.startswith(("10.", "12.")),
                )
            )
    return found


def arch_list(gpus: Iterable[HostGpu]) -> list[str]:
    """The CUDA architectures ("12.0") of a set of GPUs, sorted and without repeats."""
    return normalise_arch_list(g.compute_cap for g in gpus if g.compute_cap)


def cuda_repo_dir(os_release: OsRelease, is_wsl: bool) -> str:
    """NVIDIA's repository directory for this OS."""
    if is_wsl:
        return "wsl-ubuntu"
    if os_release.id == "ubuntu":
        return "ubuntu" + os_release.version_id.replace(".", "")
    return os_release.id + os_release.version_id


def driver_packages(source: str, branch: str, flavour: str, kernel_flavour: str | None = None) -> list[str]:
    """Packages that install the driver, in install order, for the chosen source, branch and flavour.

    Ubuntu's signed modules come per kernel flavour (generic, generic-hwe-24.04, lowlatency, ...): the running
    kernel's (see kernel_flavour), generic when unknown."""
    if source == "ubuntu":
        suffix = "-open" if flavour == "open" else ""
        modules = f"linux-modules-nvidia-{branch}{suffix}-{kernel_flavour or 'generic'}"
        return [f"nvidia-driver-{branch}{suffix}", modules]
    if int(branch) >= 590:
        # From 590 on NVIDIA ships one unversioned package and a pinning package that selects the branch (595, the
        # production branch in late 2026: nvidia-driver-pinning-595 + nvidia-open); Ubuntu keeps nvidia-driver-595-open.
        return [f"nvidia-driver-pinning-{branch}", "nvidia-open" if flavour == "open" else "cuda-drivers"]
    return [f"nvidia-open-{branch}" if flavour == "open" else f"cuda-drivers-{branch}"]


# Free space (GB) each stage needs where it writes, while its work is still to do. The venv figure is measured: the
# lab's real torch 2.14.1 venv with its CUDA wheels takes 5.4 GB (du -sh /var/cache/gpufleet-build/venv-torch-*),
# plus headroom for xformers. The others are estimates nobody here measured (no cuda-toolkit-12-8 install or
# cu128 download was possible): the toolkit's packages, pip's download cache and the build tree under work_dir
# (the build user's home), and everything the fleet cache keeps.
STAGE_DISK_GB = {"toolkit": 8, "venv": 8, "work_dir": 6, "cache": 20}


@dataclass(frozen=True)
class DiskNeed:
    """One place a stage writes: the path, the filesystem holding it and its free bytes, and what needs how much."""

    path: str
    mount: str
    free: int
    need_gb: int
    what: str


def disk_problems(needs: Iterable[DiskNeed], floor_gb: int) -> list[str]:
    """Filesystems with less free space than the stages writing to them need together (at least floor_gb each)."""
    by_mount: dict[str, list[DiskNeed]] = {}
    for need in needs:
        by_mount.setdefault(need.mount, []).append(need)
    problems = []
    for mount, group in by_mount.items():
        total = max(sum(n.need_gb for n in group), floor_gb)
        free = min(n.free for n in group)
        if free < total * GB:
            parts = ", ".join(f"{n.path} ({n.what}, {n.need_gb} GB)" if n.need_gb else n.path for n in group)
            problems.append(
                f"has {free / GB:.1f} GB free on {mount} and needs {total} GB there for {parts}; at least "
                f"min_free_disk_gb ({floor_gb} GB) on each filesystem gpufleet writes to. Free some space, or "
                "point the setting (work_dir, venv_path, cache_dir) at a larger filesystem."
            )
    return problems


@dataclass(frozen=True)
class HostProfile:
    """Everything preflight knows about one host."""

    name: str
    group: str
    os: OsRelease
    is_wsl: bool
    gpus: list[HostGpu]
    smi: SmiResult
    driver: DriverState
    lspci_missing: bool
    secure_boot: bool | None
    mem_total: int
    mem_available: int
    cpus: int
    free_disk: int
    disk_mount: str
    is_control_machine: bool
    missing_tools: tuple[str, ...] = ()
    # The account named by build_user as the host has it (facts.Account), None when it does not exist yet.
    build_account: dict[str, Any] | None = None
    # Per-stage free-space needs (stage.profile); empty: only min_free_disk_gb against free_disk is checked.
    disk_needs: tuple[DiskNeed, ...] = ()


def _unsupported_os(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    if (host.os.id, host.os.version_id) in SUPPORTED_OS:
        return []
    return [
        f"{host.os.pretty_name} is not supported; gpufleet runs on Ubuntu 24.04 (bare metal or WSL2) "
        "and Debian 12. Reinstall the host or remove it from the inventory."
    ]


def _wsl_without_ubuntu(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    if host.is_wsl and host.os.id != "ubuntu":
        return ["WSL2 is supported with Ubuntu 24.04 only; install the Ubuntu-24.04 WSL distribution."]
    return []


def _wsl_group_without_wsl(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    if host.group == "wsl" and not host.is_wsl:
        return ["is in the inventory's wsl group but is not WSL2; move it to the workstations group."]
    return []


def _missing_tools(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    return [
        f"needs the command {tool.replace('/', ' or ')}; install it: apt-get install {TOOL_PACKAGES.get(tool, tool)}"
        for tool in host.missing_tools
    ]


def _gpus_unidentifiable(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    if host.lspci_missing and not host.is_wsl:
        return ["neither lspci nor /sys/bus/pci is available, so the GPUs cannot be identified; install pciutils "
                "(apt-get install pciutils)"]
    return []


def _wsl_without_windows_driver(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    if host.is_wsl and not host.smi.available:
        return [
            "is WSL2 but /usr/lib/wsl/lib/nvidia-smi is missing: install the NVIDIA driver on Windows "
            "(Game Ready or Studio, 570 or newer) and restart WSL (wsl --shutdown)."
        ]
    return []


def _no_gpu(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    # Without lspci on bare metal the GPUs cannot be listed at all: _gpus_unidentifiable says so.
    if host.gpus or (host.lspci_missing and not host.is_wsl):
        return []
    return [
        "has no NVIDIA GPU (" + ("nvidia-smi shows none" if host.is_wsl else "the PCI bus shows none")
        + "); if the card is installed, check that it is seated and "
        "enabled in the firmware, or remove the host from the inventory."
    ]


def _unknown_gpus(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    if settings["xformers_arch_list"]:
        return []
    return [
        f"GPU {gpu.name} [10de:{gpu.device_id}] is unknown to gpufleet and no driver reports its compute "
        "capability; set xformers_arch_list for this host or report the PCI ID."
        for gpu in host.gpus if gpu.compute_cap is None
    ]


def _proprietary_flavour_on_blackwell(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    if any(g.blackwell for g in host.gpus) and settings["driver_flavour"] != "open":
        return [
            "setting driver_flavour is 'proprietary' but Blackwell GPUs (RTX 50xx) work only with the open "
            "kernel modules; set driver_flavour: open."
        ]
    return []


def _proprietary_module_on_blackwell(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    loaded = host.driver.loaded
    if any(g.blackwell for g in host.gpus) and loaded is not None and not loaded.open and not host.is_wsl:
        return [
            f"the proprietary NVIDIA kernel module {loaded.version} is loaded, and Blackwell GPUs need the open "
            "modules (nvidia-smi says 'No devices were found'). Purge the proprietary driver packages "
            "(apt-get purge 'nvidia-*' 'libnvidia-*' 'cuda-drivers*'), reboot, then run gpufleet again."
        ]
    return []


def _installs_driver(host: HostProfile, settings: dict[str, Any]) -> bool:
    """gpufleet installs the driver itself: bare metal, and no existing driver accepted."""
    return not host.is_wsl and not settings["driver_accept_existing"]


def _branch_without_the_gpus(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    if not _installs_driver(host, settings):
        return []
    branch = settings["driver_branch"]
    problems = []
    for gpu in host.gpus:
        model = GPU_MODELS.get(gpu.device_id)
        if model is None:
            continue
        if branch in model.unsupported_branches or Version(branch) < Version(model.min_driver.split(".")[0]):
            problems.append(
                f"setting driver_branch '{branch}' does not know the {model.name} [10de:{gpu.device_id}] "
                f"(first supported: {model.min_driver}); set driver_branch: \"580\"."
            )
    return problems


def _runfile_driver(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    if _installs_driver(host, settings) and host.driver.runfile:
        return [
            "has a driver installed by NVIDIA's .run installer (/usr/bin/nvidia-uninstall); packages must not be "
            "stacked on it. Run nvidia-uninstall, or set driver_accept_existing: true to keep it."
        ]
    return []


def _ubuntu_driver_source_off_ubuntu(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    if _installs_driver(host, settings) and settings["driver_source"] == "ubuntu" and host.os.id != "ubuntu":
        return [
            "setting driver_source is 'ubuntu' but the host runs "
            f"{host.os.pretty_name}; Ubuntu's archive exists on Ubuntu only: set driver_source: nvidia."
        ]
    return []


def _secure_boot_with_unsigned_modules(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    if _installs_driver(host, settings) and host.secure_boot and settings["driver_source"] == "nvidia":
        return [
            "Secure Boot is on, and NVIDIA's repository builds unsigned DKMS modules that will not load. Either "
            "set driver_source: ubuntu (Ubuntu's signed precompiled modules), or enrol a MOK key "
            "(mokutil --import) so DKMS can sign them, then run again."
        ]
    return []


def _accepted_driver_unusable(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    """An existing driver gpufleet was told to keep (driver_accept_existing) must be loaded and new enough."""
    if not settings["driver_accept_existing"] or host.is_wsl:
        return []
    loaded = host.driver.loaded
    if loaded is None:
        return [
            "setting driver_accept_existing is true but no NVIDIA kernel module is loaded; install the driver "
            "first or set driver_accept_existing: false to let gpufleet install it."
        ]
    if not loaded.open and any(g.blackwell for g in host.gpus):
        return []  # already reported: proprietary module on Blackwell
    if Version(loaded.version).major < int(settings["driver_branch"]):
        return [
            f"the existing driver {loaded.version} is older than driver_branch {settings['driver_branch']}; "
            "upgrade it, or set driver_accept_existing: false."
        ]
    return []


def _kept_driver_too_old_for_cuda(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    """A driver gpufleet will not replace (Windows' on WSL, an accepted existing one) that cannot run the toolkit."""
    if host.is_wsl:
        # A version nvidia-smi did not print as digits ("[N/A]") is not judged here.
        versions = sorted({g.driver_version for g in host.smi.gpus if _DRIVER_VERSION.match(g.driver_version)},
                          key=Version)
        problem = cuda_driver_problem(settings["cuda_version"], versions[0] if versions else None, windows=True)
    elif settings["driver_accept_existing"] and host.driver.loaded is not None:
        problem = cuda_driver_problem(settings["cuda_version"], host.driver.loaded.version)
    else:
        problem = None
    return [problem] if problem else []


def _debian_python_version(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    if (
        host.os.id == "debian"
        and settings["python_version"] != "3.11"
        and settings["python_interpreter"] is None
        and not settings["venv_adopt"]
    ):
        return [
            f"setting python_version is '{settings['python_version']}' but Debian 12's Python is 3.11; set "
            "python_version: \"3.11\", or python_interpreter to a Python "
            f"{settings['python_version']} you installed (e.g. /usr/local/bin/python{settings['python_version']})."
        ]
    return []


def _keyring_checksum_missing(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    repo_dir = cuda_repo_dir(host.os, host.is_wsl)
    uses_repo = settings["cuda_existing_home"] is None or (
        not host.is_wsl and not settings["driver_accept_existing"] and settings["driver_source"] == "nvidia"
    )
    supported = (host.os.id, host.os.version_id) in SUPPORTED_OS
    if uses_repo and supported and repo_dir not in settings["cuda_keyring_sha256"]:
        return [
            f"setting cuda_keyring_sha256 has no checksum for NVIDIA's '{repo_dir}' repository; download "
            f"{settings['cuda_repo_url'].rstrip('/')}/{repo_dir}/x86_64/cuda-keyring_1.1-1_all.deb, verify it, "
            f"and add it to the inventory: cuda_keyring_sha256: {{{repo_dir}: <sha256>, ...}} (keep the others)."
        ]
    return []


def _build_account(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    return build_account_problems(host.build_account, settings)


def _too_little_disk(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    if host.disk_needs:
        return disk_problems(host.disk_needs, settings["min_free_disk_gb"])
    if host.free_disk < settings["min_free_disk_gb"] * GB:
        return [
            f"has {host.free_disk / GB:.1f} GB free on {host.disk_mount} and needs {settings['min_free_disk_gb']} GB "
            "(setting min_free_disk_gb) for the toolkit, torch and the build; free some space."
        ]
    return []


def _too_little_memory(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    if host.mem_available < settings["min_memory_gb"] * GB:
        return [
            f"has {host.mem_available / GB:.1f} GB of memory available and the xformers build needs "
            f"{settings['min_memory_gb']} GB (setting min_memory_gb); on WSL raise memory= in .wslconfig."
        ]
    return []


# Preflight's rules, each a function of the host and its settings, in the order their problems are reported.
PREFLIGHT_CHECKS: tuple[Callable[[HostProfile, dict[str, Any]], list[str]], ...] = (
    _unsupported_os,
    _wsl_without_ubuntu,
    _wsl_group_without_wsl,
    _missing_tools,
    _gpus_unidentifiable,
    _wsl_without_windows_driver,
    _no_gpu,
    _unknown_gpus,
    _proprietary_flavour_on_blackwell,
    _proprietary_module_on_blackwell,
    _branch_without_the_gpus,
    _runfile_driver,
    _ubuntu_driver_source_off_ubuntu,
    _secure_boot_with_unsigned_modules,
    _accepted_driver_unusable,
    _kept_driver_too_old_for_cuda,
    _debian_python_version,
    _keyring_checksum_missing,
    _build_account,
    _too_little_disk,
    _too_little_memory,
)


def preflight_problems(host: HostProfile, settings: dict[str, Any]) -> list[str]:
    """Why this host cannot be provisioned with these settings; empty when it can. Each names the fix."""
    return [problem for check in PREFLIGHT_CHECKS for problem in check(host, settings)]


# Groups whose members may become root (sudo on Debian/Ubuntu, admin on old Ubuntu, wheel elsewhere).
ADMIN_GROUPS = ("sudo", "admin", "wheel", "root")


def build_account_problems(account: dict[str, Any] | None, settings: dict[str, Any]) -> list[str]:
    """An existing build_user account must be gpufleet's: not root, no admin group, its home work_dir.

    gpufleet creates the account with home work_dir; an account found with another home is someone else's
    (a person, a service), whose home and shell gpufleet would change.
    """
    if account is None:
        return []
    user, work_dir = settings["build_user"], settings["work_dir"]
    fix = "set build_user to a name no account on the host has yet (gpufleet creates it), e.g. gpufleet"
    if account["uid"] == 0:
        return [f"setting build_user '{user}' is a root account (uid 0); {fix}."]
    admin = [g for g in account["groups"] if g in ADMIN_GROUPS]
    if admin:
        return [f"setting build_user '{user}' is an existing account in group {admin[0]} (may act as root); {fix}."]
    if account["home"].rstrip("/") != work_dir:
        return [f"setting build_user '{user}' is an existing account with its own home {account['home']} "
                f"(gpufleet's build user lives in work_dir {work_dir}); {fix}."]
    return []


def may_reboot(host: HostProfile, settings: dict[str, Any]) -> bool:
    """Whether gpufleet may reboot this host: never WSL, never the machine running pyinfra."""
    return settings["reboot_policy"] == "auto" and not host.is_wsl and not host.is_control_machine


def cuda_driver_problem(cuda_version: str, driver_version: str | None, windows: bool = False) -> str | None:
    """A too-old driver for the CUDA toolkit, as an error text; None when fine or unknown.

    `windows`: the driver is Windows' as WSL2's nvidia-smi reports it (own minimum, fixed on Windows, not here).
    """
    minimum = (CUDA_MIN_WINDOWS_DRIVER if windows else CUDA_MIN_DRIVER).get(cuda_version)
    if minimum is None or driver_version is None:
        return None
    if Version(driver_version) >= Version(minimum):
        return None
    if windows:
        return (
            f"the Windows NVIDIA driver is {driver_version} and CUDA {cuda_version} needs {minimum} or newer; "
            "update the NVIDIA driver on Windows (Game Ready or Studio, from nvidia.com or the GeForce app), "
            "restart WSL (wsl --shutdown in PowerShell), then run gpufleet again. Nothing inside WSL was changed."
        )
    return (
        f"CUDA {cuda_version} needs driver {minimum} or newer and the host runs {driver_version}; "
        "raise driver_branch (or, with driver_accept_existing, update the installed driver), then run again."
    )


def torch_problems(info: dict[str, Any], cuda_version: str, archs: list[str]) -> list[str]:
    """Why an installed torch cannot serve this host: CUDA version or a missing GPU architecture."""
    problems = []
    if info["cuda"] is None:
        problems.append(f"torch {info['version']} is a CPU build; install a CUDA {cuda_version} build (torch_index_url).")
        return problems
    if ".".join(str(info["cuda"]).split(".")[:2]) != cuda_version:
        problems.append(
            f"torch {info['version']} is built for CUDA {info['cuda']} but the toolkit is CUDA {cuda_version}; "
            "pin a torch_version/torch_index_url for the same CUDA, or change cuda_version."
        )
    compiled = set(info["arch_list"])
    for arch in archs:
        sm = "sm_" + arch.replace(".", "")
        if sm not in compiled:
            problems.append(
                f"torch {info['version']} has no {sm} code (it has {', '.join(sorted(compiled)) or 'none'}): the GPU "
                f"would fail with 'no kernel image is available'. Use a CUDA 12.8+ build of torch."
            )
    return problems


# What the python stage installs in every venv (and the fleet cache fetches ahead).
VENV_TOOLS = ["pip", "wheel", "setuptools", "ninja"]


def pip_conf(config: dict) -> str | None:
    """The venv's pip.conf for a mirror, or None to use PyPI."""
    if config["pip_index_url"] is None:
        return None
    lines = ["[global]", f"index-url = {config['pip_index_url']}"]
    if config["pip_trusted_hosts"]:
        lines.append("trusted-host = " + " ".join(config["pip_trusted_hosts"]))
    return "\n".join(lines) + "\n"


def torch_install_args(config: dict) -> str:
    """pip's index arguments for torch, quoted: --pre for nightlies, --trusted-host for an http index."""
    args = ["--index-url", config["torch_index_url"]]
    if config["torch_channel"] == "nightly":
        args.insert(0, "--pre")
    index_host = urlparse(config["torch_index_url"])
    if index_host.scheme == "http":
        args += ["--trusted-host", index_host.hostname or ""]
    return " ".join(shlex.quote(a) for a in args)


def smoke_stamp(config: dict, windows_driver: str | None = None) -> str:
    """The stack the result belongs to: script, driver branch, CUDA, torch, xformers source, heads, and on WSL2 the
    Windows driver's version.

    Only settings go in, and on WSL the Windows driver, which gpufleet never changes, so a run after a successful one
    computes the same stamp; changes made during a run (install, reboot) trigger the test through stack_changed()
    instead. An update of the Windows driver between runs gives a new stamp, so the test runs again.
    """
    digest = hashlib.sha256(SMOKE_SCRIPT.read_bytes())
    for key in ("driver_branch", "cuda_version", "torch_version", "xformers_source_sha256", "smoke_heads"):
        digest.update(b"\0" + str(config[key]).encode())
    if windows_driver is not None:
        digest.update(b"\0windows-driver\0" + windows_driver.encode())
    return digest.hexdigest()[:16]


def windows_driver(me: HostProfile) -> str | None:
    """The Windows driver's version(s) as WSL2's nvidia-smi reports them; None on bare metal."""
    if not me.is_wsl:
        return None
    return ",".join(sorted({gpu.driver_version for gpu in me.smi.gpus})) or None


def stale_driver_holds(packages: dict[str, str], held: set[str], branch: str) -> list[str]:
    """Held driver packages of another branch, whose holds must go before driver_branch's packages can replace them.

    A package's branch is its version's major (580.95.05-1 -> 580), else a branch number in its name.
    """
    stale = []
    for name, version in packages.items():
        if name not in held or not name.startswith(DRIVER_PACKAGE_PREFIXES):
            continue
        major = re.match(r"^(?:\d+:)?(\d{3})\.", version)
        named = re.search(r"-(\d{3})(?:-|$)", name)
        found = major[1] if major else (named[1] if named else None)
        if found is not None and found != branch:
            stale.append(name)
    return sorted(stale)


def branch_change(installed: dict[str, str], wanted: list[str]) -> bool:
    """Whether the host has a driver installed but not the wanted packages: driver_branch (or its source) changed."""
    has_driver = any(name.startswith(DRIVER_PACKAGE_PREFIXES) for name in installed)
    return has_driver and any(name not in installed for name in wanted)


def busy_reasons(busy: Any, settings: dict[str, Any]) -> list[str]:
    """What a reboot now would interrupt (a facts.BusyState), unless reboot_when_busy allows it; empty when idle."""
    if settings["reboot_when_busy"] or busy is None:
        return []
    reasons = []
    if busy.compute:
        reasons.append("GPU compute processes: " + ", ".join(f"{g.name} (pid {g.pid})" for g in busy.compute))
    if busy.users:
        reasons.append("users logged in: " + ", ".join(busy.users))
    return reasons


def kernel_flavour(running: str, metapackages: list[str]) -> str | None:
    """The running kernel's flavour as its metapackages name it: `generic-hwe-24.04` when linux-image-generic-hwe-24.04
    is installed and the kernel is a -generic one, else the release's own suffix (6.8.0-88-generic -> generic,
    6.1.0-28-amd64 -> amd64); None for a release that names no flavour (a custom kernel)."""
    match = re.match(r"^\d+\.\d+\.\d+-\d+(?:\.\d+)?-([a-z][a-z0-9-]*)$", running)
    if not match:
        return None
    suffix = match[1]
    installed = {m.split("-", 2)[2] for m in metapackages if m.startswith(("linux-image-", "linux-headers-"))}
    hwe = sorted(f for f in installed if f.startswith(f"{suffix}-hwe-"))
    return hwe[-1] if hwe else suffix


def kernels_without_module(kernels: list[Any], branch: str) -> list[str]:
    """Installed kernels (facts.InstalledKernel) that would boot without the driver_branch NVIDIA module."""
    return [k.release for k in kernels if k.nvidia is None or k.nvidia.split(".")[0] != branch]
