"""A REAL build environment for lab hosts that must compile xformers: this machine's CUDA toolkit and a torch venv.

What is real: nvcc, cicc, ptxas and CUDA's headers and libraries are this machine's own /usr/local/cuda-13.0,
bind-mounted read-only into the host at the same path; the venv holds the real torch wheel (a CUDA 13.0 build, with
its CUDA library wheels, so `import torch` works without a GPU) plus ninja, wheel and setuptools, made with the lab
base's own Debian python3.11, so its interpreter path is the same inside every host. What stays a stand-in: the GPU
and the driver (no kernel module, no libcuda), so a host can build and inspect the wheel but never run a kernel.

The venv is built once into the lab cache by chrooting into a throwaway overlay of the base; each host then mounts
an overlay of it at VENV_PATH (shared read-only lower, per-host upper), so installing xformers on one host leaves
the cached venv and the other hosts as they were.
"""

import hashlib
import json
import shutil
from pathlib import Path

from gpufleet_lab import rootfs
from gpufleet_lab.paths import CACHE_DIR
from gpufleet_lab.system import LabError, run

CUDA_HOME = "/usr/local/cuda-13.0"
CUDA_VERSION = "13.0"
TORCH_VERSION = "2.14.1"
# Where a host sees the venv (the deploy's venv_path with venv_adopt: true).
VENV_PATH = "/opt/torchvenv"
VENV_PACKAGES: tuple[str, ...] = (f"torch=={TORCH_VERSION}", "ninja", "wheel", "setuptools")

# Runs in a private mount namespace, so every mount vanishes with it: $1 base, $2 overlay upper, $3 overlay work,
# $4 mount point, $5 venv directory in the cache, $6 wheel directory, $7 venv path inside, then the packages.
BUILD_IN_CHROOT = r"""
set -e
base="$1" upper="$2" work="$3" R="$4" venv="$5" wheels="$6" inside="$7"; shift 7
mount -t overlay overlay -o "lowerdir=$base,upperdir=$upper,workdir=$work" "$R"
mkdir -p "$R$inside" "$R/mnt/wheels"
mount --bind "$venv" "$R$inside"
mount --bind -o ro "$wheels" "$R/mnt/wheels"
mount -t proc proc "$R/proc"
mount --rbind /dev "$R/dev"
chroot "$R" /usr/bin/python3 -m venv "$inside"
chroot "$R" "$inside/bin/python" -m pip install --quiet --no-index --find-links /mnt/wheels "$@"
chroot "$R" "$inside/bin/python" -W ignore -c \
  'import json, sys, torch; print(json.dumps({"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda}))'
"""


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def check_cuda() -> None:
    nvcc = Path(CUDA_HOME) / "bin/nvcc"
    if not nvcc.is_file():
        raise LabError(f"no CUDA toolkit at {CUDA_HOME} (missing {nvcc}); a lab build environment binds this "
                       "machine's toolkit into hosts, so install CUDA 13.0 there first")


def wheels() -> Path:
    """torch and its CUDA library wheels plus the build tools, for Python 3.11 (pip finds torch on local disk)."""
    target = CACHE_DIR / f"torchvenv-wheels-{_key(VENV_PACKAGES)}"
    if (target / ".complete").exists():
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # This machine is Debian 12 with a Python 3.11 too, so what pip resolves here installs in the lab base.
    run(["python3", "-m", "pip", "download", "--only-binary", ":all:", "-d", str(staging), *VENV_PACKAGES])
    (staging / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def venv_dir() -> Path:
    """The cached venv (its `venv/` is what hosts overlay); keyed by the base and the packages."""
    return CACHE_DIR / f"torchvenv-{_key(rootfs.recipe_hash(), VENV_PACKAGES, VENV_PATH)}"


def ensure_venv() -> Path:
    """Return the cached venv directory, building it first (a few minutes, once); its .complete holds the versions."""
    target = venv_dir()
    if (target / ".complete").exists():
        return target / "venv"
    check_cuda()
    base = rootfs.ensure_base()
    found = wheels()
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for sub in ("venv", "upper", "work", "root"):
        (staging / sub).mkdir(parents=True)
    proc = run(["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "sh", "-c", BUILD_IN_CHROOT,
                "gpufleet-lab-venv", str(base), str(staging / "upper"), str(staging / "work"), str(staging / "root"),
                str(staging / "venv"), str(found), VENV_PATH, *VENV_PACKAGES])
    versions = json.loads(proc.stdout.strip().splitlines()[-1])
    if versions["torch"].split("+")[0] != TORCH_VERSION:
        raise LabError(f"the lab venv got torch {versions['torch']}, expected {TORCH_VERSION}")
    for sub in ("upper", "work", "root"):
        shutil.rmtree(staging / sub)
    (staging / ".complete").write_text(json.dumps(versions, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target / "venv"


def venv_versions() -> dict[str, str]:
    """python, torch (with its local tag, e.g. 2.14.1+cu130) and torch_cuda of the cached venv."""
    return json.loads((venv_dir() / ".complete").read_text())


def mount_into(root: Path, host_dir: Path) -> None:
    """Give a host (overlay mounted at `root`, not yet started) the toolkit and its own overlay of the venv."""
    check_cuda()
    venv = ensure_venv()
    cuda = root / CUDA_HOME.lstrip("/")
    cuda.mkdir(parents=True, exist_ok=True)
    run(["mount", "--bind", CUDA_HOME, str(cuda)])
    run(["mount", "-o", "remount,bind,ro", str(cuda)])
    upper, work = host_dir / "venv-upper", host_dir / "venv-work"
    upper.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    point = root / VENV_PATH.lstrip("/")
    point.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={venv},upperdir={upper},workdir={work}", str(point)])
