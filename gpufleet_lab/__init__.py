"""gpufleet's test lab: real hosts over SSH on this machine, with local mirrors and simulated GPUs.

`python -m gpufleet_lab prepare|up|down|status` (root only). What a test host is:

- a Debian 12 root filesystem built once with mmdebstrap (rootfs.py), cached under /var/cache/gpufleet-lab
  keyed by a hash of its recipe; each host is an overlayfs mount over it, so creating one takes a moment;
- its own network namespace on the bridge gflab0 (10.213.47.0/24, mirrors on .1), without a default route:
  anything else answers "Network is unreachable" (network.py);
- sshd (key-only, its own ed25519 host key, recorded in the lab's known_hosts) as PID 1 of its own PID,
  mount, UTS and IPC namespaces, chrooted into the overlay (hosts.py);
- SIMULATED GPU HARDWARE, since no GPU exists here (hardware.py): a tmpfs over /sys/bus/pci with a fake
  0000:01:00.0 (10de:2b87 RTX 5090 D, 10de:2b8c 5090 D v2, or none) that the real `lspci -nn` reads, and
  a writable tmpfs over /proc/driver whose nvidia/version names the "loaded" open module, so a test can
  make it stale to simulate a driver/library mismatch (`Lab.set_loaded_driver`);
- apt sources pointing only at the lab's mirrors (mirrors.py): a signed flat repo of the real Debian
  packages in os_packages.py, and signed flat repos laid out like NVIDIA's (cuda/repos/debian12/x86_64/ ...)
  holding STAND-IN packages with NVIDIA's names and file layout (standins.py); a PEP 503 index with the
  real pip/setuptools/wheel/ninja wheels and a STAND-IN torch wheel; the real xformers 0.0.35 sdist;
- on request (`add_hosts(n, build_env=True)`, `up --build-env`), a REAL build environment (buildenv.py): this
  machine's CUDA 13.0 toolkit bind-mounted read-only and a host-own overlay of a cached venv with the real
  torch 2.14.1+cu130, so the xformers stage compiles for real; `Lab.build_settings()` gives the matching settings.

Teardown (`Lab.down`) kills processes by the PIDs found in the lab's namespaces and its pid file, unmounts,
deletes namespaces and the bridge; `Lab.up` runs it first, so a crashed run needs no manual cleanup.
"""

from gpufleet_lab.lab import Lab, prepare

__all__ = ["Lab", "prepare"]
