"""CI's real xformers build: the same host-side script a deploy runs, on this machine's CUDA, cached by fingerprint.

`python -m gpufleet_lab.ci_build` makes the build venv (torch from pip), fetches and checks the sdist with pip,
computes the fingerprint and runs `files/xformers/build_wheel.sh` into `<cache>/xformers/<fingerprint>/`;
an unchanged rerun finds the finished manifest there and builds nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gpufleet.buildplan import BUILD_SCRIPT, CUBIN_READER, WheelBuild, build_command
from gpufleet.fingerprint import (
    WheelInputs,
    file_sha256,
    fingerprint,
    read_patch_series,
)
from gpufleet.settings import REPO_ROOT, load_settings

REPO = REPO_ROOT
CACHE = Path(os.environ.get("GPUFLEET_BUILD_CACHE", "/var/cache/gpufleet-build"))
CUDA_HOME = os.environ.get("GPUFLEET_CI_CUDA_HOME", "/usr/local/cuda-13.0")
# Version, checksum and patch series are the deploy's own defaults, so CI builds exactly what hosts build.
_DEFAULTS = {name: setting.default for name, setting in load_settings().items()}
XFORMERS_VERSION: str = _DEFAULTS["xformers_version"]
SDIST_SHA256: str = _DEFAULTS["xformers_source_sha256"]
PATCH_DIR = REPO / _DEFAULTS["xformers_patch_dir"]
# The torch wheel for Python 3.11 that lies on this machine's disk (a CUDA 13.0 build).
TORCH_VERSION = "2.14.1"
PYTHON = "python3.11"
ARCH_LIST = ("12.0",)
MAX_JOBS = 2
# cuobjdump from PyPI (no CUDA 13.0 release there; any 13.x reads 13.0 output); the ELF reader is the fallback.
CUOBJDUMP_PACKAGE = "nvidia-cuda-cuobjdump==13.5.37"


@dataclass(frozen=True)
class CiWheel:
    out_dir: Path
    wheel: Path
    manifest: dict[str, object]
    venv_python: Path


def sdist_path() -> Path:
    return CACHE / "sdist" / f"xformers-{XFORMERS_VERSION}.tar.gz"


def venv_dir() -> Path:
    return CACHE / f"venv-torch-{TORCH_VERSION}"


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(argv), flush=True)
    return subprocess.run(argv, check=True, text=True, **kwargs)  # type: ignore[call-overload]


def ensure_venv() -> Path:
    """Build venv with torch, ninja, wheel, setuptools and cuobjdump; pip leaves what is already satisfied alone."""
    python = venv_dir() / "bin/python"
    probe = f"import torch, ninja; assert torch.__version__.split('+')[0] == {TORCH_VERSION!r}"
    if python.exists() and find_cuobjdump(python) and subprocess.run(
            [str(python), "-c", probe], capture_output=True).returncode == 0:
        return python
    if not python.exists():
        _run([PYTHON, "-m", "venv", str(venv_dir())])
    _run([str(python), "-m", "pip", "install", "--quiet", f"torch=={TORCH_VERSION}", "ninja", "wheel", "setuptools",
          CUOBJDUMP_PACKAGE])
    return python


def ensure_sdist(python: Path) -> Path:
    """The xformers sdist from PyPI via pip, checked against the pinned sha256."""
    path = sdist_path()
    if path.exists() and file_sha256(path) == SDIST_SHA256:
        return path
    path.unlink(missing_ok=True)
    # Without isolation pip reads the metadata with the venv's torch; with it, pip would fetch another torch.
    _run([str(python), "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps", "--no-build-isolation",
          f"xformers=={XFORMERS_VERSION}", "-d", str(path.parent)])
    actual = file_sha256(path)
    if actual != SDIST_SHA256:
        raise SystemExit(f"{path}: sha256 {actual}, expected {SDIST_SHA256}; PyPI served another file")
    return path


def nvcc_version(cuda_home: str) -> str:
    out = subprocess.run([f"{cuda_home}/bin/nvcc", "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    if not match:
        raise SystemExit(f"cannot read the CUDA release from {cuda_home}/bin/nvcc --version:\n{out}")
    return match.group(1)


def venv_versions(python: Path) -> tuple[str, str, Optional[str]]:
    """(python major.minor.micro, torch version, torch's CUDA version) of the build venv."""
    out = subprocess.run(
        [str(python), "-c", "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"],
        capture_output=True, text=True, check=True).stdout.split()
    return out[0], out[1], None if out[2] == "None" else out[2]


def find_cuobjdump(python: Path) -> Optional[str]:
    found = sorted(python.parent.parent.glob("lib/python*/site-packages/nvidia/cu*/bin/cuobjdump"))
    return str(found[-1]) if found and os.access(found[-1], os.X_OK) else None


def ensure_wheel(cuda_home: str = CUDA_HOME) -> CiWheel:
    """Build (or find in the cache) the sm_120 wheel exactly as a host would."""
    python = ensure_venv()
    sdist = ensure_sdist(python)
    py_version, torch_version, torch_cuda = venv_versions(python)
    cuda = nvcc_version(cuda_home)
    if torch_cuda and torch_cuda.split(".")[0] != cuda.split(".")[0]:
        # torch's BuildExtension refuses a major mismatch; say so before minutes of setup output.
        raise SystemExit(f"torch {torch_version} was built with CUDA {torch_cuda}, nvcc in {cuda_home} is {cuda}")
    inputs = WheelInputs(XFORMERS_VERSION, SDIST_SHA256, read_patch_series(PATCH_DIR), torch_version, cuda, py_version,
                         ARCH_LIST)
    fp = fingerprint(inputs)
    out_dir = CACHE / "xformers" / fp
    build = WheelBuild(sdist=str(sdist), sdist_sha256=SDIST_SHA256, patch_dir=str(PATCH_DIR), arch_list=ARCH_LIST,
                       max_jobs=MAX_JOBS, python=str(python), cuda_home=cuda_home, out_dir=str(out_dir),
                       fingerprint=fp, cubins_reader=str(REPO / CUBIN_READER), cuobjdump=find_cuobjdump(python))
    print(f"xformers {XFORMERS_VERSION}: torch {torch_version} (CUDA {torch_cuda}), nvcc {cuda}, "
          f"python {py_version}, arch {';'.join(ARCH_LIST)} -> fingerprint {fp}", flush=True)
    _run(build_command(str(REPO / BUILD_SCRIPT), build))
    manifest = json.loads((out_dir / "manifest.json").read_text())
    return CiWheel(out_dir, out_dir / str(manifest["wheel"]), manifest, python)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda-home", default=CUDA_HOME, help="CUDA toolkit whose nvcc builds the wheel")
    args = parser.parse_args(argv)
    try:
        result = ensure_wheel(args.cuda_home)
    except subprocess.CalledProcessError as error:
        print(f"ci_build: {' '.join(map(str, error.cmd))} exited {error.returncode}", file=sys.stderr)
        return error.returncode or 1
    print(json.dumps({"wheel": str(result.wheel), **result.manifest}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
