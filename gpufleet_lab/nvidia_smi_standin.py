#!/usr/bin/python3
"""gpufleet lab STAND-IN for nvidia-smi: no GPU exists on test hosts, so this answers from the lab's
simulated hardware (/sys/bus/pci, /proc/driver/nvidia/version) the way the real tool would."""

import json
import re
import sys
from pathlib import Path

DRIVER_VERSION = "@DRIVER_VERSION@"
GPUS: dict[str, list] = json.loads("""@GPUS@""")
# On a WSL host the GPU is Windows': no /proc/driver/nvidia and no NVIDIA PCI device; this names its device id.
WSL_GPU: int | None = json.loads("@WSL_GPU@")
# What the GPU runs, as the lab sets it (Lab.set_compute_apps): "pid, process_name, used_memory" lines.
COMPUTE_APPS = Path("@COMPUTE_APPS@")


def loaded_module() -> tuple[str, bool] | None:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module for x86_64\s+([0-9.]+)|x86_64 Kernel Module\s+([0-9.]+)", text)
    if not match:
        return None
    return (match.group(1) or match.group(2), "Open Kernel Module" in text)


def visible_gpus() -> list[tuple[str, int]]:
    found = []
    for dev in sorted(Path("/sys/bus/pci/devices").glob("*")):
        try:
            vendor = int((dev / "vendor").read_text(), 16)
            device = int((dev / "device").read_text(), 16)
            klass = int((dev / "class").read_text(), 16)
        except (OSError, ValueError):
            continue
        if vendor == 0x10DE and klass >> 16 == 0x03:
            found.append((dev.name, device))
    return found


def field(name: str, slot: str, device: int) -> str:
    spec = GPUS.get(f"{device:04x}", ["NVIDIA Graphics Device", 0])
    values = {
        "name": spec[0], "pci.device_id": f"0x{device:04X}10DE", "compute_cap": "12.0",
        "driver_version": DRIVER_VERSION, "pci.bus_id": "0000" + slot.upper(),
        "memory.total": f"{spec[1]} MiB", "count": str(len(visible_gpus())),
    }
    if name not in values:
        print(f'Field "{name}" is not a valid field to query.', file=sys.stderr)
        sys.exit(2)
    return values[name]


def main(argv: list[str]) -> int:
    if WSL_GPU is not None:
        return report([("0000:01:00.0", WSL_GPU)], argv)
    module = loaded_module()
    if module is None:
        print("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
              "Make sure that the latest NVIDIA driver is installed and running.")
        return 9
    version, is_open = module
    if version != DRIVER_VERSION:
        print("Failed to initialize NVML: Driver/library version mismatch")
        print(f"NVML library version: {DRIVER_VERSION.rsplit('.', 1)[0]}")
        return 18
    gpus = visible_gpus() if is_open else []  # Blackwell is invisible to the proprietary module
    if not gpus:
        print("No devices were found")
        return 6
    return report(gpus, argv)


def report(gpus: list[tuple[str, int]], argv: list[str]) -> int:
    apps = next((a.split("=", 1)[1] for a in argv if a.startswith("--query-compute-apps=")), None)
    if apps is not None:
        wanted = [f.strip() for f in apps.split(",")]
        known = ("pid", "process_name", "used_memory")
        for line in COMPUTE_APPS.read_text().splitlines() if COMPUTE_APPS.exists() else []:
            values = dict(zip(known, (v.strip() for v in line.split(","))))
            print(", ".join(values.get(f, "[N/A]") for f in wanted))
        return 0
    query = next((a.split("=", 1)[1] for a in argv if a.startswith("--query-gpu=")), None)
    if query is not None:
        for slot, device in gpus:
            print(", ".join(field(f.strip(), slot, device) for f in query.split(",")))
        return 0
    if "-L" in argv:
        for i, (slot, device) in enumerate(gpus):
            print(f"GPU {i}: {field('name', slot, device)} (UUID: GPU-00000000-0000-0000-0000-00000000000{i})")
        return 0
    print(f"NVIDIA-SMI {DRIVER_VERSION}    Driver Version: {DRIVER_VERSION}    CUDA Version: 13.0  (gpufleet lab stand-in)")
    for i, (slot, device) in enumerate(gpus):
        print(f"  {i}  {field('name', slot, device)}  {slot}  {field('memory.total', slot, device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
