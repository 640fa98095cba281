"""Simulated GPU hardware for test hosts: a fake PCI tree and a fake loaded-module file.

No GPU exists on the lab machine, so each test host gets, in its own mount namespace:

- a tmpfs mounted over `/sys/bus/pci` holding `devices/0000:01:00.0/` with a 256-byte `config` space
  (vendor 10de, the chosen device id, class 0300) and the `vendor`/`device`/`class` attribute files.
  The REAL `lspci -nn` on the host reads this tree and prints `[10de:2b87]`; real PCI devices are hidden.
- a tmpfs mounted over `/proc/driver` holding `nvidia/version` with the line a loaded open kernel module
  writes ("NVIDIA UNIX Open Kernel Module for x86_64  580.95.05 ..."), or nothing when no module is
  "loaded". The lab rewrites it from outside (`Lab.set_loaded_driver`) to simulate a reboot into a new
  driver or, left stale after a package update, a driver/library version mismatch.

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


def pci_config(device_id: int) -> bytes:
    config = bytearray(256)
    struct.pack_into("<HH", config, 0x00, NVIDIA_VENDOR, device_id)
    config[0x08] = 0xA1                      # revision
    config[0x09:0x0C] = bytes([0x00, 0x00, 0x03])  # prog-if, subclass 00 (VGA), class 03 (display)
    struct.pack_into("<HH", config, 0x2C, NVIDIA_VENDOR, device_id)  # subsystem
    return bytes(config)


def write_pci_tree(root: Path, gpu: str) -> None:
    """Fill `root` (what the host sees as /sys/bus/pci) for the GPU named by a `GPUS` key."""
    if gpu not in GPUS:
        raise ValueError(f"unknown lab GPU {gpu!r}; choose one of {sorted(GPUS)}")
    (root / "devices").mkdir(parents=True, exist_ok=True)
    (root / "drivers").mkdir(exist_ok=True)
    spec = GPUS[gpu]
    if spec is None:
        return
    dev = root / "devices" / PCI_SLOT
    dev.mkdir()
    (dev / "config").write_bytes(pci_config(spec.device_id))
    attributes = {
        "vendor": f"0x{NVIDIA_VENDOR:04x}", "device": f"0x{spec.device_id:04x}", "class": "0x030000",
        "subsystem_vendor": f"0x{NVIDIA_VENDOR:04x}", "subsystem_device": f"0x{spec.device_id:04x}",
        "revision": "0xa1", "irq": "0", "enable": "1",
    }
    for name, value in attributes.items():
        (dev / name).write_text(value + "\n")


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
