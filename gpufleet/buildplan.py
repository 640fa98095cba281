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
CUBIN_READER = "files/xformers/cubins.py"

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


# Root's own directory on each host: wheels staged for install and the stamps root trusts. Never inside work_dir
# (the build user owns that tree and could swap anything in it for a link).
ROOT_STATE_DIR = "/var/lib/gpufleet-root"
# The fingerprint of the xformers installed on the host, written by root after the install.
INSTALLED_STAMP = f"{ROOT_STATE_DIR}/xformers/installed"
# A wheel file name a build may report: one path component, nothing a shell or a path could read differently.
WHEEL_NAME = re.compile(r"xformers-[A-Za-z0-9_.+-]+\.whl")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """A manifest for this fingerprint that names something no build writes: the build user's files were changed."""


@dataclass(frozen=True)
class HostLayout:
    """Where the xformers build lives on a host: under `work_dir` (owned by build_user) the build; under
    ROOT_STATE_DIR (root's) the wheel staged for install and the stamp of what is installed."""

    script: str
    cubins_reader: str
    patch_dir: str
    sdist: str
    out_dir: str
    staging: str
    stamp: str

    @property
    def manifest(self) -> str:
        """Present only after a finished build; its fingerprint and wheel name say what was built."""
        return f"{self.out_dir}/manifest.json"

    @property
    def log(self) -> str:
        return f"{self.out_dir}/build.log"

    @property
    def staged_checksum(self) -> str:
        """`sha256sum -c` line of the staged wheel, written by root: what is installed and its sha256."""
        return f"{self.staging}/wheel.sha256"


def host_layout(work_dir: str, xformers_version: str, fingerprint: str) -> HostLayout:
    """Host paths for one fingerprint: the script and cubins.py are shipped side by side, wheels per fingerprint."""
    base = f"{work_dir.rstrip('/')}/xformers"
    return HostLayout(
        script=f"{base}/build_wheel.sh",
        cubins_reader=f"{base}/cubins.py",
        patch_dir=f"{base}/patches-{xformers_version}",
        sdist=f"{base}/xformers-{xformers_version}.tar.gz",
        out_dir=f"{base}/wheels/{fingerprint}",
        staging=f"{ROOT_STATE_DIR}/xformers/{fingerprint}",
        stamp=INSTALLED_STAMP,
    )


def parse_manifest(manifest_json: Optional[str], fingerprint: str, where: str = "manifest.json") -> Optional[dict]:
    """A finished build's manifest for `fingerprint`, checked; None when there is none (absent, unreadable, another
    fingerprint): build it. ManifestError when it is this fingerprint's but names an unsafe wheel or checksum."""
    if not manifest_json:
        return None
    try:
        manifest = json.loads(manifest_json)
    except ValueError:
        return None
    if not isinstance(manifest, dict) or manifest.get("fingerprint") != fingerprint:
        return None
    wheel, sha = manifest.get("wheel"), manifest.get("wheel_sha256")
    if not isinstance(wheel, str) or not WHEEL_NAME.fullmatch(wheel):
        raise ManifestError(
            f"{where} names the wheel {wheel!r}, which is no xformers wheel file name (xformers-*.whl, no '/'); "
            "someone changed the build user's files: remove the directory and run again")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ManifestError(f"{where} gives the wheel's sha256 as {sha!r}, not 64 hex digits; remove the "
                            "directory and run again")
    return manifest


def finished_wheel(manifest_json: Optional[str], fingerprint: str, where: str = "manifest.json") -> Optional[str]:
    """Wheel file name a finished build left for `fingerprint`, from manifest.json's text; None means build it.

    Raises ManifestError for a manifest of this fingerprint naming something no build writes.
    """
    manifest = parse_manifest(manifest_json, fingerprint, where)
    return None if manifest is None else manifest["wheel"]


def staged_checksum_line(manifest: dict) -> str:
    """The staged wheel's `sha256sum -c` line; the manifest went through parse_manifest."""
    return f"{manifest['wheel_sha256']}  {manifest['wheel']}\n"


def install_commands(python: str, layout: HostLayout) -> list[str]:
    """Install exactly the staged wheel, its sha256 checked in the same command, in root's staging directory."""
    staging = shlex.quote(layout.staging)
    return [
        f"cd {staging} && sha256sum -c --quiet wheel.sha256 && "
        f"wheel=$(sed -n 's/^[0-9a-f]\\{{64\\}}  \\(xformers-[A-Za-z0-9_.+-]*\\.whl\\)$/\\1/p' wheel.sha256) && "
        f'[ -n "$wheel" ] && {shlex.quote(python)} -m pip install --no-deps --no-index --force-reinstall '
        f'{staging}/"$wheel"',
    ]


def build_paths(layout: HostLayout, work_dir: str) -> tuple[list[str], list[str]]:
    """(paths, trees) in the build user's tree that root writes to or reads: none may be a symbolic link."""
    base = layout.script.rsplit("/", 1)[0]
    paths = [work_dir, base, f"{base}/wheels", layout.out_dir, layout.script, layout.cubins_reader, layout.sdist,
             layout.patch_dir, layout.manifest]
    return paths, [layout.patch_dir]
