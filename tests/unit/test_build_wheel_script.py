"""files/xformers/build_wheel.sh up to the compiler: checksum, patch series, up-to-date and leftover handling."""

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from gpufleet_lab.ci_build import SDIST_SHA256
from tests.conftest import cannot_run

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "files/xformers/build_wheel.sh"
PATCHES = REPO / "files/patches/xformers-0.0.35"
CUTLASS = "xformers/ops/fmha/cutlass.py"
NVCC_HOME = "/usr/local/cuda-13.0"


@pytest.fixture(scope="module")
def sdist(xformers_sdist: Path) -> Path:
    return xformers_sdist


@pytest.fixture
def nvcc_home() -> str:
    if not Path(NVCC_HOME, "bin/nvcc").exists():
        cannot_run(f"no nvcc under {NVCC_HOME} (this machine kind ships CUDA 13.0 there)")
    return NVCC_HOME


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True)


def unpack(sdist: Path, out: Path, sha256: str) -> subprocess.CompletedProcess[str]:
    return run("--unpack-only", "--sdist", str(sdist), "--sha256", sha256, "--patch-dir", str(PATCHES),
               "--out-dir", str(out))


def mini_sdist(tmp_path: Path, cutlass_py: str) -> tuple[Path, str]:
    """A tarball shaped like the sdist (one top directory with setup.py) holding only cutlass.py."""
    path = tmp_path / "xformers-0.0.35.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in (("setup.py", ""), (CUTLASS, cutlass_py)):
            data = text.encode()
            info = tarfile.TarInfo(f"xformers-0.0.35/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def original_cutlass(sdist: Path) -> str:
    with tarfile.open(sdist) as tar:
        member = tar.extractfile(f"xformers-0.0.35/{CUTLASS}")
        assert member is not None
        return member.read().decode()


def test_series_applies_cleanly_to_the_real_sdist(sdist: Path, tmp_path: Path) -> None:
    result = unpack(sdist, tmp_path, SDIST_SHA256)
    assert result.returncode == 0, result.stderr
    patched = (tmp_path / "src/xformers-0.0.35" / CUTLASS).read_text()
    assert "    CUDA_MAXIMUM_COMPUTE_CAPABILITY = (12, 0)\n" in patched
    assert "CUDA_MAXIMUM_COMPUTE_CAPABILITY = (9, 0)" not in patched
    assert "CUDA_MAXIMUM_COMPUTE_CAPABILITY = FwOp.CUDA_MAXIMUM_COMPUTE_CAPABILITY" in patched
    assert "applied 0001-cutlass-pt-allow-sm120.patch" in (tmp_path / "build.log").read_text()


def test_the_cap_is_the_only_change(sdist: Path, tmp_path: Path) -> None:
    assert unpack(sdist, tmp_path, SDIST_SHA256).returncode == 0
    before = original_cutlass(sdist).splitlines()
    after = (tmp_path / "src/xformers-0.0.35" / CUTLASS).read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after)
    assert changed == [("    CUDA_MAXIMUM_COMPUTE_CAPABILITY = (9, 0)", "    CUDA_MAXIMUM_COMPUTE_CAPABILITY = (12, 0)")]


def test_already_applied_patch_is_skipped(sdist: Path, tmp_path: Path) -> None:
    fixed = original_cutlass(sdist).replace("= (9, 0)", "= (12, 0)")
    mini, sha = mini_sdist(tmp_path, fixed)
    result = unpack(mini, tmp_path / "out", sha)
    assert result.returncode == 0, result.stderr
    assert "0001-cutlass-pt-allow-sm120.patch is already applied" in result.stdout
    assert (tmp_path / "out/src/xformers-0.0.35" / CUTLASS).read_text() == fixed


def test_patch_that_does_not_apply_stops_naming_it(sdist: Path, tmp_path: Path) -> None:
    mini, sha = mini_sdist(tmp_path, original_cutlass(sdist).replace("= (9, 0)", "= (10, 0)"))
    result = unpack(mini, tmp_path / "out", sha)
    assert result.returncode == 4
    assert "patch 0001-cutlass-pt-allow-sm120.patch does not apply" in result.stderr
    assert not (tmp_path / "out/src").exists()


def test_wrong_checksum_stops_before_unpacking(tmp_path: Path) -> None:
    mini, sha = mini_sdist(tmp_path, "x = 1\n")
    result = unpack(mini, tmp_path / "out", "0" * 64)
    assert result.returncode == 3
    assert f"has sha256 {sha}, expected {'0' * 64}" in result.stderr
    assert not (tmp_path / "out/src").exists()


def test_missing_option_is_named(tmp_path: Path) -> None:
    result = run("--sdist", "x.tar.gz", "--patch-dir", str(PATCHES), "--out-dir", str(tmp_path))
    assert result.returncode == 2
    assert "--sha256 is required" in result.stderr


def build_args(tmp_path: Path, sdist: Path, sha: str, fingerprint: str) -> list[str]:
    # A venv without torch: the script stops at its torch check, before any compiling.
    bare = tmp_path / "bare"
    if not bare.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    empty_series = tmp_path / "no-patches"
    empty_series.mkdir(exist_ok=True)
    (empty_series / "series").write_text("")
    return ["--sdist", str(sdist), "--sha256", sha, "--patch-dir", str(empty_series), "--arch-list", "12.0",
            "--max-jobs", "1", "--python", str(bare / "bin/python"), "--cuda-home", NVCC_HOME,
            "--out-dir", str(tmp_path / "out"), "--fingerprint", fingerprint]


def finished_build(out: Path, fingerprint: str) -> Path:
    out.mkdir()
    wheel = out / "xformers-0.0.35-py39-none-linux_x86_64.whl"
    wheel.write_bytes(b"wheel bytes")
    manifest = {"fingerprint": fingerprint, "wheel": wheel.name,
                "wheel_sha256": hashlib.sha256(b"wheel bytes").hexdigest()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return wheel


def test_finished_build_with_the_same_fingerprint_is_up_to_date(tmp_path: Path, nvcc_home: str) -> None:
    mini, sha = mini_sdist(tmp_path, "x = 1\n")
    finished_build(tmp_path / "out", "fp1")
    result = run(*build_args(tmp_path, mini, sha, "fp1"))
    assert result.returncode == 0, result.stderr
    assert "up to date: xformers-0.0.35-py39-none-linux_x86_64.whl" in result.stdout


def test_changed_wheel_or_fingerprint_leaves_nothing_that_looks_finished(tmp_path: Path, nvcc_home: str) -> None:
    mini, sha = mini_sdist(tmp_path, "x = 1\n")
    wheel = finished_build(tmp_path / "out", "old")
    (tmp_path / "out/.build.killed").mkdir()
    # The run stops at the torch check, after the cleanup it must do first.
    result = run(*build_args(tmp_path, mini, sha, "new"))
    assert result.returncode == 2 and "cannot import torch" in result.stderr
    assert not wheel.exists() and not (tmp_path / "out/manifest.json").exists()
    assert not (tmp_path / "out/.build.killed").exists()
