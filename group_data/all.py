"""Every gpufleet setting with its default: one line of comment each, mirrored in the README's settings table.

Override any of them per group or per host in the inventory (`inventory/hosts.yaml`, key `settings:`).
The annotation is the type the inventory validator enforces.
"""

from typing import Literal, Optional

# Where the NVIDIA driver comes from: NVIDIA's CUDA repository, or Ubuntu's archive (signed modules, for Secure Boot).
driver_source: Literal["nvidia", "ubuntu"] = "nvidia"
# Driver branch to install and hold (late 2026: 580 is NVIDIA's long-term branch, 595 production); change it and run gpufleet rollout to upgrade.
driver_branch: str = "580"
# Kernel module flavour; Blackwell GPUs (RTX 50xx) work only with "open", so "proprietary" is refused there.
driver_flavour: Literal["open", "proprietary"] = "open"
# Accept a driver installed another way (image, runfile) when it is open and at least driver_branch; install nothing.
driver_accept_existing: bool = False
# After a driver install or a driver/library mismatch: "auto" reboots the host (never WSL, never the control machine), "never" stops it with instructions.
reboot_policy: Literal["auto", "never"] = "auto"
# Seconds to wait for a rebooted host to come back.
reboot_timeout: int = 600
# Seconds apt waits for a package lock held by another process (e.g. unattended-upgrades) before failing.
apt_lock_timeout: int = 300
# Add nvidia-, libnvidia- and cuda- to unattended-upgrades' package blacklist so nothing updates the driver behind your back.
hold_driver_updates: bool = True
# With reboot_policy auto, reboot even a host whose GPU runs compute processes or where users are logged in; otherwise such a host is left "reboot pending".
reboot_when_busy: bool = False
# Seconds a run waits for another gpufleet run's lock on a host (or on this machine's wheel cache and reports) before failing that host; 0 = fail at once.
lock_timeout: int = 0

# CUDA toolkit version (major.minor), installed as cuda-toolkit-X-Y under /usr/local/cuda-X.Y.
cuda_version: str = "12.8"
# Base URL of NVIDIA's CUDA repositories; the OS directory (ubuntu2404, wsl-ubuntu, debian12) and x86_64/ are appended. Point it at a mirror for air-gapped labs.
cuda_repo_url: str = "https://developer.download.nvidia.com/compute/cuda/repos"
# sha256 of cuda-keyring_1.1-1_all.deb per repository directory; a repository without an entry is refused until you pin one.
cuda_keyring_sha256: dict = {"ubuntu2404": "d2a6b11c096396d868758b86dab1823b25e14d70333f1dfa74da5ddaf6a06dba"}
# Use a toolkit already installed at this path (e.g. /usr/local/cuda-13.0) instead of installing one; its nvcc must report cuda_version.
cuda_existing_home: Optional[str] = None

# Python version of the venv; Ubuntu 24.04's system Python is 3.12, Debian 12's is 3.11.
python_version: str = "3.12"
# Interpreter that provides python_version when the OS's python3 is another version (e.g. /usr/local/bin/python3.12); None = the OS's python3.
python_interpreter: Optional[str] = None
# Unprivileged user that owns the venv and runs builds and the smoke test; created when missing.
build_user: str = "gpufleet"
# Virtual environment that torch and xformers go into.
venv_path: str = "/opt/gpufleet/venv"
# Adopt an existing venv at venv_path as it is (its Python and torch are validated, not reinstalled).
venv_adopt: bool = False
# Working directory on each host for sources, builds, logs and manifests (owned by build_user).
work_dir: str = "/var/lib/gpufleet"

# Package index that serves torch; the default is PyTorch's CUDA 12.8 nightly index.
torch_index_url: str = "https://download.pytorch.org/whl/nightly/cu128"
# "nightly" installs with --pre; "stable" for release indexes.
torch_channel: Literal["nightly", "stable"] = "nightly"
# Exact torch version including its local tag, the same on every host; cu128 nightlies stopped in April 2026, this is the last one published.
torch_version: str = "2.12.0.dev20260407+cu128"

# xformers release built from source.
xformers_version: str = "0.0.35"
# Where the xformers sdist is downloaded from (PyPI by default; point it at a mirror).
xformers_source_url: str = "https://files.pythonhosted.org/packages/de/5a/6e27734bd793adc44d0b8d294e67cfacf4ec590572c1aef51d683fc7a791/xformers-0.0.35.tar.gz"
# sha256 the downloaded sdist must have.
xformers_source_sha256: str = "f7fc183a58e4bf0e2ae339a18fb1b1d4a37854c0f2545b4f360fef001646ab76"
# Patch series applied before the build, relative to the repository root (a `series` file lists the patches in order).
xformers_patch_dir: str = "files/patches/xformers-0.0.35"
# CUDA architectures to build for, e.g. ["12.0"] or ["9.0", "12.0"]; None = the union of the fleet's GPU architectures.
xformers_arch_list: Optional[list] = None
# Host that builds the wheel for the fleet; None = the cache host when it is a workstation of the fleet, else the first host that needs it.
xformers_builder: Optional[str] = None
# Parallel compile jobs; None = from available memory (about 3 GB a job), at most the CPU count.
xformers_max_jobs: Optional[int] = None
# Directory on the control machine where built wheels are kept by fingerprint (relative to the repository root).
wheel_cache_dir: str = ".cache/wheels"
# Use ccache for nvcc so a rebuild with unchanged sources takes seconds.
xformers_ccache: bool = False

# Index for everything else pip installs (pip, wheel, ninja, ...); None = PyPI. Set for air-gapped labs.
pip_index_url: Optional[str] = None
# Hosts pip trusts without TLS (needed for an http:// mirror).
pip_trusted_hosts: list = []

# Free disk (GB) required, at least, on each filesystem gpufleet writes to (work_dir, venv_path, /usr/local, cache_dir); each stage's own need is checked too. 10 or more.
min_free_disk_gb: int = 30
# Available memory (GB) required for the xformers build (one compile job needs about 3).
min_memory_gb: int = 4

# Attention heads for the smoke test's seed shapes (the seed table gives none).
smoke_heads: int = 1
# Directory on the control machine where per-run fleet reports are written.
report_dir: str = "reports"

# Directory on the cache host (inventory group `cache`) where apt-cacher-ng and devpi-server keep what they fetched.
cache_dir: str = "/var/cache/gpufleet"
# Addresses the cache servers listen on; [] = the cache host's inventory address and 127.0.0.1.
cache_listen: list = []
# Port of the caching apt proxy (apt-cacher-ng) on the cache host.
cache_apt_port: int = 3142
# Port of the caching Python index (devpi-server) on the cache host.
cache_pip_port: int = 3141
# Allow cache_listen to hold 0.0.0.0 or :: (every network of the cache host); the servers have no access control.
cache_listen_any: bool = False
