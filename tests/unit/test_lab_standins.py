"""The lab's stand-ins read correctly through the real tools, without a running lab (root only to install the tools).

Everything built here is a STAND-IN for NVIDIA hardware or software; lspci, depmod, modinfo and Python are real.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpufleet_lab import hardware, standins
from gpufleet_lab.kmod_elf import modinfo_object
from gpufleet_lab.runner import parse

# lspci, depmod, modinfo and dpkg-deb: installed by the lab_tools fixture where missing.
pytestmark = pytest.mark.usefixtures("lab_tools")


@pytest.mark.parametrize(("gpu", "expected"), [("5090d", "[10de:2b87]"), ("5090dv2", "[10de:2b8c]")])
def test_real_lspci_reads_the_fake_pci_tree(tmp_path: Path, gpu: str, expected: str) -> None:
    hardware.write_pci_tree(tmp_path, gpu)
    out = subprocess.run(["lspci", "-O", f"sysfs.path={tmp_path}", "-nn"], capture_output=True, text=True,
                         check=True).stdout
    assert f"VGA compatible controller [0300]: NVIDIA Corporation Device {expected}" in out


def test_host_without_gpu_shows_no_nvidia_device(tmp_path: Path) -> None:
    hardware.write_pci_tree(tmp_path, "none")
    out = subprocess.run(["lspci", "-O", f"sysfs.path={tmp_path}", "-nn"], capture_output=True, text=True,
                         check=True)
    assert "10de:" not in out.stdout


def test_real_modinfo_reads_the_stand_in_module_version(tmp_path: Path) -> None:
    release = "6.1.0-lab"
    module = tmp_path / "lib/modules" / release / "updates/dkms/nvidia.ko"
    module.parent.mkdir(parents=True)
    module.write_bytes(modinfo_object({"version": "580.95.05", "license": "Dual MIT/GPL", "name": "nvidia"}))
    subprocess.run(["depmod", "-b", str(tmp_path), release], check=True, capture_output=True)
    version = subprocess.run(["modinfo", "-b", str(tmp_path), "-k", release, "-F", "version", "nvidia"],
                             capture_output=True, text=True, check=True).stdout
    assert version.strip() == "580.95.05"


def test_loaded_module_file_names_the_open_module_and_can_be_unloaded(tmp_path: Path) -> None:
    hardware.write_loaded_driver(tmp_path, "580.95.05")
    text = (tmp_path / "nvidia/version").read_text()
    assert "NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build" in text
    hardware.write_loaded_driver(tmp_path, None)
    assert not (tmp_path / "nvidia").exists()


def test_stand_in_torch_wheel_reports_the_pinned_cu128_nightly_with_sm_120(tmp_path: Path) -> None:
    wheel = standins.torch_wheel(tmp_path)
    assert wheel.name == "torch-2.12.0.dev20260407+cu128-py3-none-any.whl"
    probe = "import torch; print(torch.__version__, torch.version.cuda, 'sm_120' in torch.cuda.get_arch_list())"
    out = subprocess.run([sys.executable, "-c", probe], env={"PYTHONPATH": str(wheel)},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["2.12.0.dev20260407+cu128", "12.8", "True"]


def test_sized_stand_ins_carry_their_payload_uncompressed_and_install_with_pip(tmp_path: Path) -> None:
    """The benchmark's realistic sizes (benchmarks/cache_upstream_bytes.py), here with 2 MB of random bytes."""
    import base64
    import hashlib
    import os
    import zipfile

    payload = os.urandom(2 * 10**6)
    wheel = standins.torch_wheel(tmp_path / "w", payload=payload)
    deb = standins.cuda_toolkit_deb(tmp_path / "d", payload=payload)
    assert wheel.stat().st_size > len(payload) and deb.stat().st_size > len(payload)
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo("torch/lib/libgpufleet_standin_payload.bin")
        assert info.compress_type == zipfile.ZIP_STORED and zf.read(info) == payload
        record = zf.read("torch-2.12.0.dev20260407+cu128.dist-info/RECORD").decode()
    digest = base64.urlsafe_b64encode(hashlib.sha256(payload).digest()).rstrip(b"=").decode()
    assert f"torch/lib/libgpufleet_standin_payload.bin,sha256={digest},{len(payload)}" in record.splitlines()
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], capture_output=True, text=True, check=True)
    assert (target / "torch/lib/libgpufleet_standin_payload.bin").read_bytes() == payload
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    assert f" {len(payload)} " in next(l for l in listing.splitlines() if "libgpufleet_standin_payload.bin" in l)
    assert standins.torch_wheel(tmp_path / "plain").read_bytes() == standins.torch_wheel(tmp_path / "again").read_bytes()


def test_driver_packages_carry_the_bumped_version(tmp_path: Path) -> None:
    debs = standins.driver_debs(tmp_path, version="580.105.08-1")
    names = {subprocess.run(["dpkg-deb", "-f", str(d), "Package", "Version"], capture_output=True, text=True,
                            check=True).stdout.replace("\n", " ").strip() for d in debs}
    assert "Package: nvidia-open-580 Version: 580.105.08-1" in names
    assert "Package: nvidia-driver-pinning-580 Version: 580.105.08-1" in names


def test_runner_reads_pyinfra_json_per_host_and_operation() -> None:
    payload = {"plan": [], "results": {"operations": [
        {"name": "Install tree", "success": ["a"], "no_change": ["b"], "error": []},
        {"name": "Write file", "success": [], "no_change": ["a"], "error": ["b"]},
    ], "totals": {}, "failed_hosts": ["c"]}}
    proc = subprocess.CompletedProcess(["pyinfra"], 1, json.dumps(payload), "boom")
    run = parse(["pyinfra"], proc)
    assert run.changes("a") == ["Install tree"] and run.errors("b") == ["Write file"]
    assert run.failed_hosts == ["c"]
    with pytest.raises(AssertionError, match="a re-run changed something"):
        run.assert_no_changes(["a"])


def test_driver_branches_exclude_each_other_as_nvidias_packages_do(tmp_path: Path) -> None:
    """580's versioned and 595's unversioned stand-ins provide, conflict with and replace the same virtual packages,
    so apt removes the old branch itself when the new one is installed."""
    fields = ["Package", "Provides", "Conflicts", "Replaces", "Depends"]

    def control(deb: Path) -> dict[str, str]:
        out = subprocess.run(["dpkg-deb", "-f", str(deb), *fields], capture_output=True, text=True, check=True).stdout
        return dict(line.split(": ", 1) for line in out.splitlines())

    old = {c["Package"]: c for c in map(control, standins.driver_debs(tmp_path / "580"))}
    new = {c["Package"]: c for c in map(control, standins.driver_debs(tmp_path / "595", "595", "595.45.04-1"))}
    assert set(new) == {"nvidia-driver-pinning-595", "nvidia-open", "nvidia-dkms-open", "nvidia-utils"}
    assert new["nvidia-open"]["Depends"] == "nvidia-dkms-open (= 595.45.04-1), nvidia-utils (= 595.45.04-1)"
    for a, b in (("nvidia-dkms-580-open", "nvidia-dkms-open"), ("nvidia-utils-580", "nvidia-utils"),
                 ("nvidia-open-580", "nvidia-open")):
        virtual = old[a]["Conflicts"]
        assert virtual == new[b]["Conflicts"] == old[a]["Replaces"] == new[b]["Replaces"]
        assert old[a]["Provides"].startswith(f"{virtual} (= 580.")
        assert new[b]["Provides"].startswith(f"{virtual} (= 595.")
