"""Pure decisions for the xformers build: architecture lists, compile parallelism, the build script's command line."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

GIB = 1024**3
# The largest single nvcc process (sparse24_gemm_sm90.cu) peaks at about 2.6 GB; 3 leaves room for the rest.
DEFAULT_PER_JOB_GB = 3.0
BUILD_SCRIPT = "files/xformers/build_wheel.sh"
CUBIN_READER = "gpufleet/cubins.py"

_ARCH = re.compile(r"^(\d+)\.(\d)([af]?)(\+PTX)?$")


def normalise_arch(arch: str) -> str:
    """One TORCH_CUDA_ARCH_LIST entry in canonical spelling: " 12.0 " -> "12.0", "9.0a+ptx" -> "9.0a+PTX"."""
    text = arch.strip()
    match = _ARCH.match(text[:-4] + "+PTX" if text.upper().endswith("+PTX") else text)
    if not match:
        raise ValueError(f"not a CUDA architecture like 12.0, 9.0a or 8.6+PTX: {arch!r}")
    major, minor, suffix, ptx = match.groups()
    return f"{int(major)}.{minor}{suffix}{ptx or ''}"


def _arch_sort_key(arch: str) -> tuple[int, int, str]:
    major, rest = arch.split(".", 1)
    return (int(major), int(rest[0]), rest[1:])


def normalise_arch_list(archs: Iterable[str] | str) -> list[str]:
    """Sorted, deduplicated arch list; a string may separate entries with ';', ',' or spaces."""
    items = re.split(r"[;,\s]+", archs) if isinstance(archs, str) else list(archs)
    return sorted({normalise_arch(a) for a in items if a.strip()}, key=_arch_sort_key)


def arch_union(host_arch_lists: Iterable[Optional[Sequence[str]]]) -> list[str]:
    """Architectures one wheel must cover for every host: the union of each host's list (hosts without GPUs add none)."""
    union: list[str] = []
    for archs in host_arch_lists:
        union += list(archs or [])
    return normalise_arch_list(union)


def torch_cuda_arch_list(archs: Iterable[str] | str) -> str:
    """The TORCH_CUDA_ARCH_LIST value for an arch list."""
    return ";".join(normalise_arch_list(archs))


def max_jobs(mem_available_bytes: int, cpu_count: int, per_job_gb: float = DEFAULT_PER_JOB_GB) -> int:
    """Compile jobs that fit in available memory at `per_job_gb` GiB each: at least 1, at most one per CPU."""
    if per_job_gb <= 0:
        raise ValueError(f"per_job_gb must be positive, got {per_job_gb}")
    by_memory = int(mem_available_bytes // (per_job_gb * GIB))
    return max(1, min(max(cpu_count, 1), by_memory))


@dataclass(frozen=True)
class WheelBuild:
    """Everything `files/xformers/build_wheel.sh` needs on a host; paths are host paths."""

    sdist: str
    sdist_sha256: str
    patch_dir: str
    arch_list: Sequence[str]
    max_jobs: int
    python: str
    cuda_home: str
    out_dir: str
    fingerprint: str
    ccache: bool = False
    cubins_reader: Optional[str] = None
    cuobjdump: Optional[str] = None


def build_command(script: str, build: WheelBuild) -> list[str]:
    """argv that runs the host-side build script for `build`."""
    argv = [
        script,
        "--sdist", build.sdist,
        "--sha256", build.sdist_sha256,
        "--patch-dir", build.patch_dir,
        "--arch-list", torch_cuda_arch_list(build.arch_list),
        "--max-jobs", str(build.max_jobs),
        "--python", build.python,
        "--cuda-home", build.cuda_home,
        "--ccache", "1" if build.ccache else "0",
        "--out-dir", build.out_dir,
        "--fingerprint", build.fingerprint,
    ]
    if build.cubins_reader:
        argv += ["--cubins", build.cubins_reader]
    if build.cuobjdump:
        argv += ["--cuobjdump", build.cuobjdump]
    return argv


def build_shell_command(script: str, build: WheelBuild) -> str:
    """`build_command` quoted for a shell (pyinfra's server.shell)."""
    return shlex.join(build_command(script, build))


@dataclass(frozen=True)
class HostLayout:
    """Where the xformers build lives on a host, under the `work_dir` setting (all owned by build_user)."""

    script: str
    cubins_reader: str
    patch_dir: str
    sdist: str
    out_dir: str

    @property
    def manifest(self) -> str:
        """Present only after a finished build; its fingerprint and wheel name say what was built."""
        return f"{self.out_dir}/manifest.json"

    @property
    def log(self) -> str:
        return f"{self.out_dir}/build.log"


def host_layout(work_dir: str, xformers_version: str, fingerprint: str) -> HostLayout:
    """Host paths for one fingerprint: the script and cubins.py are shipped side by side, wheels per fingerprint."""
    base = f"{work_dir.rstrip('/')}/xformers"
    return HostLayout(
        script=f"{base}/build_wheel.sh",
        cubins_reader=f"{base}/cubins.py",
        patch_dir=f"{base}/patches-{xformers_version}",
        sdist=f"{base}/xformers-{xformers_version}.tar.gz",
        out_dir=f"{base}/wheels/{fingerprint}",
    )


def finished_wheel(manifest_json: Optional[str], fingerprint: str) -> Optional[str]:
    """Wheel file name a finished build left for `fingerprint`, from manifest.json's text; None means build it."""
    if not manifest_json:
        return None
    try:
        manifest = json.loads(manifest_json)
    except ValueError:
        return None
    if not isinstance(manifest, dict) or manifest.get("fingerprint") != fingerprint:
        return None
    wheel = manifest.get("wheel")
    return wheel if isinstance(wheel, str) and wheel.endswith(".whl") else None
