"""Simulated GPU hardware for test hosts: a fake PCI tree and a fake loaded-module file.

No GPU exists on the lab machine, so each test host gets, in its own mount namespace:

- a tmpfs mounted over `/sys/bus/pci` holding `devices/0000:01:00.0/` with a 256-byte `config` space
  (vendor 10de, the chosen device id, class 0300) and the `vendor`/`device`/`class` attribute files.
  The REAL `lspci -nn` on the host reads this tree and prints `[10de:2b87]`; real PCI devices are hidden.
- a tmpfs mounted over `/proc/driver` holding `nvidia/version` with the line a loaded open kernel module
  writes ("NVIDIA UNIX Open Kernel Module for x86_64  580.95.05 ..."), or nothing when no module is
  "loaded". The lab rewrites it from outside (`Lab.set_loaded_driver`) to simulate a reboot into a new
  driver or, left stale after a package update, a driver/library version mismatch.

A WSL host (platform "wsl") instead shows what WSL2 shows: the PCI tree holds only Microsoft's virtual
render device (1414:008e, no NVIDIA entry), /proc/driver has no nvidia/, /proc/sys/kernel/osrelease reads
"...-microsoft-standard-WSL2" (a file bind-mounted over it; `uname -r` still gives this machine's kernel), and
/usr/lib/wsl/lib holds a stand-in nvidia-smi (off PATH) answering for the Windows driver's GPU, whose version a test
changes to simulate a Windows driver update (`Lab.set_windows_driver`), and /etc/os-release says Ubuntu 24.04 (the
only distribution gpufleet accepts under WSL2) while the packages stay Debian 12's.

Both tmpfs mounts live under the lab state dir in the root namespace and are bind-mounted into the host,
so the lab can change them while the host runs; teardown unmounts them.
"""

import struct
from dataclasses import dataclass
from pathlib import Path

NVIDIA_VENDOR = 0x10DE
PCI_SLOT = "0000:01:00.0"


@dataclass(frozen=True)
class Gpu:
    device_id: int
    name: str  # as the driver prints it (open-gpu-kernel-modules g_nv_name_released.h)
    memory_mib: int


# The GPUs a test host can be given; "none" is a host without an NVIDIA card.
GPUS: dict[str, Gpu | None] = {
    "5090": Gpu(0x2B85, "NVIDIA GeForce RTX 5090", 32607),
    "5090d": Gpu(0x2B87, "NVIDIA GeForce RTX 5090 D", 32607),
    "5090dv2": Gpu(0x2B8C, "NVIDIA GeForce RTX 5090 D v2", 24463),
    "none": None,
}


MICROSOFT_VENDOR = 0x1414
WSL_RENDER_DEVICE = 0x008E  # "Basic Render Driver", what lspci shows inside WSL2
WSL_KERNEL_RELEASE = "5.15.167.4-microsoft-standard-WSL2"
WSL_DRIVER_VERSION = "581.57"  # stand-in for the Windows driver's version as WSL's nvidia-smi reports it
# What Ubuntu 24.04's /etc/os-release says (tests/data/captured/ubuntu2404-os-release.txt), shown by WSL hosts.
UBUNTU_2404_OS_RELEASE = """PRETTY_NAME="Ubuntu 24.04.3 LTS"
NAME="Ubuntu"
VERSION_ID="24.04"
VERSION="24.04.3 LTS (Noble Numbat)"
VERSION_CODENAME=noble
ID=ubuntu
ID_LIKE=debian
HOME_URL="https://www.ubuntu.com/"
SUPPORT_URL="https://help.ubuntu.com/"
BUG_REPORT_URL="https://bugs.launchpad.net/ubuntu/"
PRIVACY_POLICY_URL="https://www.ubuntu.com/legal/terms-and-policies/privacy-policy"
UBUNTU_CODENAME=noble
LOGO=ubuntu-logo
"""


def pci_config(vendor: int, device_id: int, subclass: int = 0x00) -> bytes:
    config = bytearray(256)
    struct.pack_into("<HH", config, 0x00, vendor, device_id)
    config[0x08] = 0xA1                      # revision
    config[0x09:0x0C] = bytes([0x00, subclass, 0x03])  # prog-if, subclass (00 VGA, 02 3D), class 03 (display)
    struct.pack_into("<HH", config, 0x2C, vendor, device_id)  # subsystem
    return bytes(config)


def _write_device(root: Path, vendor: int, device_id: int, subclass: int) -> None:
    dev = root / "devices" / PCI_SLOT
    dev.mkdir()
    (dev / "config").write_bytes(pci_config(vendor, device_id, subclass))
    attributes = {
        "vendor": f"0x{vendor:04x}", "device": f"0x{device_id:04x}", "class": f"0x03{subclass:02x}00",
        "subsystem_vendor": f"0x{vendor:04x}", "subsystem_device": f"0x{device_id:04x}",
        "revision": "0xa1", "irq": "0", "enable": "1",
    }
    for name, value in attributes.items():
        (dev / name).write_text(value + "\n")


def write_pci_tree(root: Path, gpu: str, wsl: bool = False) -> None:
    """Fill `root` (what the host sees as /sys/bus/pci) for the GPU named by a `GPUS` key."""
    if gpu not in GPUS:
        raise ValueError(f"unknown lab GPU {gpu!r}; choose one of {sorted(GPUS)}")
    (root / "devices").mkdir(parents=True, exist_ok=True)
    (root / "drivers").mkdir(exist_ok=True)
    spec = GPUS[gpu]
    if wsl:
        _write_device(root, MICROSOFT_VENDOR, WSL_RENDER_DEVICE, 0x02)
    elif spec is not None:
        _write_device(root, NVIDIA_VENDOR, spec.device_id, 0x00)


# /proc/uptime of a lab host until its stand-in reboot (Lab.install_standin_reboot) writes a smaller one.
UPTIME_BEFORE_REBOOT = "86400.00 86400.00\n"
UPTIME_AFTER_REBOOT = "1.00 1.00\n"
REBOOT_LOG = "/var/log/gpufleet-lab-reboots"
# Lines "pid, name, used MiB" the stand-in nvidia-smi prints for --query-compute-apps (Lab.set_compute_apps).
COMPUTE_APPS = "/etc/gpufleet-lab/compute-apps"


def module_version_line(version: str) -> str:
    return (f"NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {version}  Release Build  "
            f"(gpufleet-lab stand-in)\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")


def write_loaded_driver(root: Path, version: str | None) -> None:
    """Make `root` (the host's /proc/driver) say the open module `version` is loaded, or none is."""
    version_file = root / "nvidia" / "version"
    if version is None:
        version_file.unlink(missing_ok=True)
        if version_file.parent.exists():
            version_file.parent.rmdir()
        return
    version_file.parent.mkdir(parents=True, exist_ok=True)
    version_file.write_text(module_version_line(version))
