"""The real xformers 0.0.35 wheel CI builds with nvcc for sm_120 (cached by fingerprint after the first run)."""

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gpufleet.buildplan import BUILD_SCRIPT, WheelBuild, build_command
from gpufleet_lab.ci_build import (
    CUDA_HOME,
    PATCH_DIR,
    SDIST_SHA256,
    CiWheel,
    find_cuobjdump,
    nvcc_version,
    sdist_path,
)
from tests.host_scripts import cubins

parse_cuobjdump_listing, read_elf_device_code = cubins.parse_cuobjdump_listing, cubins.read_elf_device_code

pytestmark = pytest.mark.build

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def c_so(ci_wheel: CiWheel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wheel") / "_C.so"
    path.write_bytes(zipfile.ZipFile(ci_wheel.wheel).read("xformers/_C.so"))
    return path


@pytest.fixture(scope="module")
def installed(ci_wheel: CiWheel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run([str(ci_wheel.venv_python), "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(ci_wheel.wheel)], check=True)
    return target


def venv_run(ci_wheel: CiWheel, site: Path, code: str) -> str:
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(ci_wheel.venv_python), "-W", "ignore", "-c", code], env=env, capture_output=True,
                          text=True, check=True).stdout


def test_c_extension_holds_sm120_cubins_read_from_the_elf(c_so: Path) -> None:
    assert "sm_120" in read_elf_device_code(c_so.read_bytes()).cubins


def test_cuobjdump_lists_sm120_cubins_and_agrees_with_the_elf_reader(ci_wheel: CiWheel, c_so: Path) -> None:
    cuobjdump = find_cuobjdump(ci_wheel.venv_python)
    assert cuobjdump, "ci_build installs nvidia-cuda-cuobjdump into the build venv"
    listing = subprocess.run([cuobjdump, "--list-elf", str(c_so)], capture_output=True, text=True, check=True).stdout
    assert parse_cuobjdump_listing(listing).cubins == ("sm_120",)
    assert parse_cuobjdump_listing(listing) == read_elf_device_code(c_so.read_bytes())


def test_manifest_matches_the_wheel_and_its_fingerprint_directory(ci_wheel: CiWheel) -> None:
    manifest = ci_wheel.manifest
    assert manifest["fingerprint"] == ci_wheel.out_dir.name
    assert manifest["wheel_sha256"] == hashlib.sha256(ci_wheel.wheel.read_bytes()).hexdigest()
    assert manifest["cubin_archs"] == ["sm_120"]
    assert manifest["inputs"]["patches"] == ["0001-cutlass-pt-allow-sm120.patch"]  # type: ignore[index]


def test_installed_wheel_allows_cutlass_pt_up_to_sm120(ci_wheel: CiWheel, installed: Path) -> None:
    out = venv_run(ci_wheel, installed, (
        "import xformers.ops.fmha.cutlass as c; "
        "print(c.__file__); print(c.FwOp.CUDA_MAXIMUM_COMPUTE_CAPABILITY, c.BwOp.CUDA_MAXIMUM_COMPUTE_CAPABILITY)"))
    path, caps = out.strip().splitlines()
    assert Path(path).is_relative_to(installed)
    assert caps == "(12, 0) (12, 0)"
    assert "CUDA_MAXIMUM_COMPUTE_CAPABILITY = (12, 0)" in (installed / "xformers/ops/fmha/cutlass.py").read_text()


def test_installed_wheel_records_the_arch_list_it_was_built_for(ci_wheel: CiWheel, installed: Path) -> None:
    build_info = json.loads((installed / "xformers/cpp_lib.json").read_text())
    assert build_info["env"]["TORCH_CUDA_ARCH_LIST"] == "12.0"


def test_unchanged_rerun_builds_nothing(ci_wheel: CiWheel) -> None:
    manifest = ci_wheel.out_dir / "manifest.json"
    before = manifest.stat().st_mtime_ns
    rerun = subprocess.run([sys.executable, "-m", "gpufleet_lab.ci_build"], cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"up to date: {ci_wheel.wheel.name} (fingerprint {ci_wheel.out_dir.name})" in rerun.stdout
    assert manifest.stat().st_mtime_ns == before


def test_c_extension_loads_beside_the_torch_it_was_built_with(ci_wheel: CiWheel, installed: Path) -> None:
    out = venv_run(ci_wheel, installed, (
        "import torch, xformers._cpp_lib as lib; print(lib._cpp_library_load_exception); "
        "print(torch.ops.xformers._nvcc_build_version()); print(torch.ops.xformers.sparse24_sparsify_both_ways)"))
    exception, nvcc, op = out.strip().splitlines()
    assert exception == "None"
    major, minor = nvcc_version(CUDA_HOME).split(".")
    assert nvcc.startswith(f"({major}, {minor}, ")
    assert op == "xformers.sparse24_sparsify_both_ways"


def test_killed_build_leaves_nothing_that_looks_finished(ci_wheel: CiWheel, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build = WheelBuild(sdist=str(sdist_path()), sdist_sha256=SDIST_SHA256, patch_dir=str(PATCH_DIR), arch_list=["12.0"],
                       max_jobs=1, python=str(ci_wheel.venv_python), cuda_home=CUDA_HOME, out_dir=str(out),
                       fingerprint="killed")
    argv = build_command(str(REPO / BUILD_SCRIPT), build)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("[1/"):
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists() and not list(out.glob("*.whl"))
    assert list(out.glob(".build.*")), "the killed run's work directory is left behind for the next run to remove"
    # The next run starts over: here with a venv that has no torch, so it stops right after the cleanup.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    bare = dataclasses.replace(build, python=str(tmp_path / "bare/bin/python"))
    rerun = subprocess.run(build_command(str(REPO / BUILD_SCRIPT), bare), capture_output=True, text=True)
    assert rerun.returncode == 2 and "cannot import torch" in rerun.stderr
    assert not list(out.glob(".build.*"))


def test_failed_build_exits_5_with_the_compiler_error_and_keeps_the_log(ci_wheel: CiWheel, tmp_path: Path) -> None:
    # nvcc 13 no longer knows sm_50: the first compile step fails within seconds.
    build = WheelBuild(sdist=str(sdist_path()), sdist_sha256=SDIST_SHA256, patch_dir=str(PATCH_DIR), arch_list=["5.0"],
                       max_jobs=1, python=str(ci_wheel.venv_python), cuda_home=CUDA_HOME, out_dir=str(tmp_path),
                       fingerprint="fails")
    result = subprocess.run(build_command(str(REPO / BUILD_SCRIPT), build), capture_output=True, text=True)
    assert result.returncode == 5
    assert "Unsupported gpu architecture 'compute_50'" in result.stderr
    assert "Unsupported gpu architecture" in (tmp_path / "build.log").read_text()
    assert not (tmp_path / "manifest.json").exists() and not list(tmp_path.glob("*.whl"))
    assert not list(tmp_path.glob(".build.*"))
