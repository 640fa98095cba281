"""Fact parsers on real captured output, and facts that fail one host (FactProcessError) on output they do not know."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pyinfra.api.exceptions import FactProcessError

from gpufleet import facts
from gpufleet.facts import (
    NO_TOOL,
    DriverState,
    LoadedModule,
    OsRelease,
    ParseError,
    PciGpu,
    SmiGpu,
    SmiResult,
    parse_df,
    parse_dpkg_versions,
    parse_driver_state,
    parse_kernel_headers,
    parse_lspci,
    parse_meminfo,
    parse_nvidia_smi,
    parse_os_release,
    parse_proc_driver_version,
    parse_secure_boot,
    parse_wsl,
)

CAPTURED = Path(__file__).resolve().parent.parent / "data" / "captured"


def captured(name: str) -> str:
    return (CAPTURED / name).read_text()


def fake_pci_device(root: Path, slot: str, device: int, pci_class: int, revision: int = 0xA1) -> None:
    """A sysfs PCI function that the real lspci reads with -O sysfs.path=ROOT: config space plus the id files."""
    function = root / "devices" / f"0000:{slot}"
    function.mkdir(parents=True)
    config = bytearray(256)
    config[0:2] = (0x10DE).to_bytes(2, "little")
    config[2:4] = device.to_bytes(2, "little")
    config[0x08] = revision
    config[0x09:0x0C] = pci_class.to_bytes(3, "little")
    (function / "config").write_bytes(bytes(config))
    (function / "vendor").write_text("0x10de\n")
    (function / "device").write_text(f"0x{device:04x}\n")
    (function / "class").write_text(f"0x{pci_class:06x}\n")


@pytest.fixture
def real_lspci(lab_tools: None):
    """The real lspci (pciutils, installed by the lab_tools fixture where missing) reading a sysfs tree."""
    return _real_lspci


def _real_lspci(sysfs: Path) -> str:
    return subprocess.run(
        ["lspci", "-O", f"sysfs.path={sysfs}", "-nn"], check=True, capture_output=True, text=True
    ).stdout


def test_debian12_os_release_is_debian_12():
    assert parse_os_release(captured("debian12-os-release.txt")) == OsRelease(
        "debian", "12", "bookworm", "Debian GNU/Linux 12 (bookworm)"
    )


def test_ubuntu2404_os_release_is_ubuntu_24_04():
    assert parse_os_release(captured("ubuntu2404-os-release.txt")) == OsRelease(
        "ubuntu", "24.04", "noble", "Ubuntu 24.04.3 LTS"
    )


def test_os_release_without_id_is_a_parse_error():
    with pytest.raises(ParseError, match="no ID= line"):
        parse_os_release('NAME="Something"\nVERSION_ID="1"\n')


def test_wsl2_kernel_release_is_wsl_with_windows_nvidia_smi():
    probe = captured("wsl2-kernel-osrelease.txt") + "smi=yes\n"
    assert parse_wsl(probe) == {"kernel": "5.15.167.4-microsoft-standard-WSL2", "is_wsl": True, "nvidia_smi": True}


def test_bare_metal_kernel_release_is_not_wsl():
    probe = captured("debian12-vm-kernel-osrelease.txt") + "smi=no\n"
    result = parse_wsl(probe)
    assert result["is_wsl"] is False and result["nvidia_smi"] is False
    assert result["kernel"] == captured("debian12-vm-kernel-osrelease.txt").strip()


def test_wsl_probe_without_the_smi_line_is_a_parse_error():
    with pytest.raises(ParseError):
        parse_wsl("5.15.167.4-microsoft-standard-WSL2\n")


def test_lspci_of_a_machine_without_nvidia_lists_no_gpu():
    text = captured("debian12-vm-lspci-nn.txt")
    assert "Virtio" in text
    assert parse_lspci(text) == []


@pytest.mark.parametrize(
    "device, name", [(0x2B87, "fake-sysfs-lspci-5090d.txt"), (0x2B8C, "fake-sysfs-lspci-5090dv2.txt")], ids=["5090d", "5090dv2"]
)
def test_lspci_shows_a_5090_d_by_pci_id_through_a_fake_sysfs(tmp_path, real_lspci, device, name):
    # The plan profiles use these captured lines, so they must stay what the real lspci prints.
    fake_pci_device(tmp_path, "01:00.0", device, 0x030000)
    text = real_lspci(tmp_path)
    assert text == captured(name)
    assert parse_lspci(text) == [PciGpu("01:00.0", f"{device:04x}", "NVIDIA Corporation Device")]


def test_lspci_skips_the_gpu_audio_function_and_keeps_3d_controllers(tmp_path, real_lspci):
    fake_pci_device(tmp_path, "01:00.0", 0x2B87, 0x030000)
    fake_pci_device(tmp_path, "01:00.1", 0x22E8, 0x040300)
    fake_pci_device(tmp_path, "41:00.0", 0x2330, 0x030200)
    text = real_lspci(tmp_path)
    assert text == captured("fake-sysfs-lspci-5090d-audio-h100.txt")
    assert [(g.slot, g.device_id) for g in parse_lspci(text)] == [("01:00.0", "2b87"), ("41:00.0", "2330")]


def test_lspci_line_with_bracketed_model_name_keeps_the_pci_id():
    line = "01:00.0 VGA compatible controller [0300]: NVIDIA Corporation GB202 [GeForce RTX 5090 D] [10de:2b87] (rev a1)"
    assert parse_lspci(line) == [PciGpu("01:00.0", "2b87", "NVIDIA Corporation GB202 [GeForce RTX 5090 D]")]


def test_missing_lspci_is_none_not_an_empty_list():
    assert parse_lspci(NO_TOOL) is None


def test_unrecognised_lspci_line_is_a_parse_error():
    with pytest.raises(ParseError, match="unexpected lspci line"):
        parse_lspci("pcilib: Cannot open /proc/bus/pci\n")


def test_h100_nvidia_smi_line_gives_device_id_from_the_pci_id():
    probe = captured("h100-nvidia-smi-query.txt") + "rc=0\n"
    assert parse_nvidia_smi(probe) == SmiResult(
        available=True, gpus=(SmiGpu("NVIDIA H100 80GB HBM3", "2330", "9.0", "580.159.04"),)
    )


def test_5090_d_through_wsl_nvidia_smi_line():
    probe = "NVIDIA GeForce RTX 5090 D, 0x2B8710DE, 12.0, 580.95.05\nrc=0\n"
    (gpu,) = parse_nvidia_smi(probe).gpus
    assert gpu == SmiGpu("NVIDIA GeForce RTX 5090 D", "2b87", "12.0", "580.95.05")


def test_nvml_mismatch_is_an_available_smi_with_the_error_text():
    result = parse_nvidia_smi(captured("nvml-mismatch.txt") + "rc=18\n")
    assert result.available is True
    assert result.gpus == ()
    assert result.error == "Failed to initialize NVML: Driver/library version mismatch"


def test_no_devices_were_found_is_an_error_without_gpus():
    result = parse_nvidia_smi(captured("no-devices-were-found.txt") + "rc=6\n")
    assert result == SmiResult(available=True, gpus=(), error="No devices were found")


def test_failing_nvidia_smi_without_output_reports_the_exit_code():
    assert parse_nvidia_smi("rc=9\n").error == "nvidia-smi exited with 9"


def test_missing_nvidia_smi_is_unavailable():
    assert parse_nvidia_smi(NO_TOOL) == SmiResult(available=False)


def test_nvidia_smi_line_without_pci_id_is_a_parse_error():
    # The query of FACTS.md without pci.device_id: three fields, not the four this probe asks for.
    with pytest.raises(ParseError, match="unexpected nvidia-smi line"):
        parse_nvidia_smi("NVIDIA H100 80GB HBM3, 9.0, 580.159.04\nrc=0\n")


def test_nvidia_smi_probe_without_exit_code_is_a_parse_error():
    with pytest.raises(ParseError):
        parse_nvidia_smi(captured("h100-nvidia-smi-query.txt"))


def test_open_kernel_module_is_recognised_with_its_version():
    assert parse_proc_driver_version(captured("h100-proc-driver-nvidia-version.txt")) == LoadedModule(
        "580.159.04", open=True
    )


def test_proprietary_kernel_module_is_recognised_as_not_open():
    assert parse_proc_driver_version(captured("proprietary-proc-driver-nvidia-version.txt")) == LoadedModule(
        "580.95.05", open=False
    )


def test_no_loaded_module_is_none():
    assert parse_proc_driver_version("") is None


def test_unknown_proc_version_text_is_a_parse_error():
    with pytest.raises(ParseError):
        parse_proc_driver_version("NVRM: something else\n")


def test_dpkg_lists_only_installed_packages():
    text = (
        "nvidia-open-580 580.95.05-0ubuntu1 ii \n"
        "nvidia-open-570 570.190-1 rc \n"
        "cuda-keyring 1.1-1 ii \n"
    )
    assert parse_dpkg_versions(text) == {"nvidia-open-580": "580.95.05-0ubuntu1", "cuda-keyring": "1.1-1"}


def driver_state_text(proc: str, modinfo: str, dpkg: str = "", runfile: str = "no") -> str:
    return f"== proc\n{proc}== modinfo\n{modinfo}\n== dpkg\n{dpkg}== runfile\n{runfile}\n"


def test_driver_state_with_matching_module_has_no_mismatch():
    state = parse_driver_state(
        driver_state_text(
            captured("h100-proc-driver-nvidia-version.txt"), "580.159.04", "nvidia-open-580 580.159.04-1 ii \n"
        )
    )
    assert state == DriverState(
        LoadedModule("580.159.04", True), "580.159.04", {"nvidia-open-580": "580.159.04-1"}, runfile=False
    )
    assert state.mismatch is False


def test_driver_updated_on_disk_behind_the_loaded_module_is_a_mismatch():
    state = parse_driver_state(driver_state_text(captured("h100-proc-driver-nvidia-version.txt"), "580.95.05"))
    assert state.mismatch is True


def test_no_driver_at_all_is_an_empty_state():
    state = parse_driver_state(driver_state_text("", ""))
    assert state == DriverState(None, None, {}, runfile=False)
    assert state.mismatch is False


def test_runfile_install_is_seen():
    assert parse_driver_state(driver_state_text("", "", runfile="yes")).runfile is True


def test_modinfo_error_text_is_not_taken_for_a_version():
    state = parse_driver_state(driver_state_text("", "modinfo: ERROR: Module nvidia not found."))
    assert state.on_disk_version is None


def test_this_machines_meminfo_gives_bytes_and_cpus():
    text = captured("debian12-vm-meminfo.txt")
    result = parse_meminfo(text + "cpus=2\n")
    total_kb = int(next(line for line in text.splitlines() if line.startswith("MemTotal:")).split()[1])
    assert result["total"] == total_kb * 1024
    assert 0 < result["available"] <= result["total"]
    assert result["cpus"] == 2


def test_meminfo_without_cpu_count_is_a_parse_error():
    with pytest.raises(ParseError):
        parse_meminfo(captured("debian12-vm-meminfo.txt"))


def test_this_machines_df_gives_free_bytes_and_mount():
    result = parse_df(captured("debian12-vm-df-root.txt"))
    available_kb = int(captured("debian12-vm-df-root.txt").splitlines()[1].split()[3])
    assert result == {"free": available_kb * 1024, "mount": "/"}


def test_df_error_is_a_parse_error():
    with pytest.raises(ParseError):
        parse_df("df: /nowhere: No such file or directory\n")


@pytest.mark.parametrize(
    "name, state",
    [
        ("mokutil-sb-enabled.txt", True),
        ("mokutil-sb-disabled.txt", False),
        ("mokutil-no-efi.txt", False),
    ],
)
def test_secure_boot_state_from_mokutil(name, state):
    assert parse_secure_boot(captured(name)) is state



def test_firmware_without_secure_boot_support_is_secure_boot_off():
    assert parse_secure_boot(captured("mokutil-no-secure-boot-support.txt")) is False


def test_missing_mokutil_is_unknown_secure_boot():
    assert parse_secure_boot(NO_TOOL) is None


def test_unknown_mokutil_output_is_a_parse_error():
    with pytest.raises(ParseError):
        parse_secure_boot("mokutil: permission denied\n")


def test_kernel_headers_probe():
    assert parse_kernel_headers("6.8.0-51-generic\nyes\n") == {"release": "6.8.0-51-generic", "present": True}
    assert parse_kernel_headers("6.8.0-51-generic\nno\n")["present"] is False


def test_kernel_headers_probe_with_extra_output_is_a_parse_error():
    with pytest.raises(ParseError):
        parse_kernel_headers("6.8.0-51-generic\nmaybe\n")


@pytest.mark.parametrize(
    "fact, garbage",
    [
        (facts.OsInfo, ["<html>404</html>"]),
        (facts.WslInfo, ["5.15.167.4-microsoft-standard-WSL2"]),
        (facts.NvidiaPciGpus, ["pcilib: Cannot open /proc/bus/pci"]),
        (facts.NvidiaSmi, ["NVIDIA GeForce RTX 5090 D, 12.0, 580.95.05"]),
        (facts.DriverStateFact, ["== proc", "NVRM version: something unexpected"]),
        (facts.MemoryInfo, ["MemTotal: 1 kB", "cpus=two"]),
        (facts.FreeDisk, ["df: /var/lib/gpufleet: Input/output error"]),
        (facts.SecureBoot, ["mokutil: unexpected"]),
        (facts.KernelHeaders, ["6.8.0-51-generic"]),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else None,
)
def test_fact_given_garbage_fails_that_host_only(fact, garbage):
    with pytest.raises(FactProcessError, match=fact.__name__):
        fact().process(garbage)


def run_fact_here(fact: facts.FactBase, *args: str, env: dict[str, str] | None = None):
    """The fact's real command in a shell on this machine, through the fact's own process()."""
    result = subprocess.run(["sh", "-c", fact.command(*args)], capture_output=True, text=True, check=True, env=env)
    lines = result.stdout.splitlines()
    return fact.process(lines) if lines else fact.default()


def nvidia_display_devices_in_sysfs() -> set[tuple[str, str]]:
    """(slot, device id) of every NVIDIA display function this machine's sysfs lists, read without any tool."""
    found = set()
    for function in Path("/sys/bus/pci/devices").glob("*"):
        try:
            vendor = (function / "vendor").read_text().strip()
            pci_class = (function / "class").read_text().strip()[2:6]
            device = (function / "device").read_text().strip()[2:]
        except OSError:
            continue
        if vendor == "0x10de" and pci_class in {"0300", "0302"}:
            found.add((function.name, device.lower()))
    return found


def without_tool(tool: str, tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH holds every tool of this machine's PATH except `tool` (links in tmp_path)."""
    stand_in_path = tmp_path / f"path-without-{tool}"
    stand_in_path.mkdir()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        for entry in Path(directory).glob("*") if Path(directory).is_dir() else ():
            target = stand_in_path / entry.name
            if entry.name != tool and not target.exists() and os.access(entry, os.X_OK):
                target.symlink_to(entry)
    return {**os.environ, "PATH": str(stand_in_path)}


def test_fact_commands_run_here_and_parse(tmp_path):
    # Whatever this machine is (a VM without a GPU, or a GPU host), each fact must agree with what the machine
    # shows through files read directly here.
    assert run_fact_here(facts.OsInfo()) == parse_os_release(Path("/etc/os-release").read_text())
    is_wsl = "microsoft-standard-wsl2" in Path("/proc/sys/kernel/osrelease").read_text().lower()
    assert run_fact_here(facts.WslInfo())["is_wsl"] is is_wsl
    expected_gpus = nvidia_display_devices_in_sysfs()
    # The sysfs fallback always runs (PATH without lspci); lspci's own branch where this machine has it.
    sysfs_gpus = run_fact_here(facts.NvidiaPciGpus(), env=without_tool("lspci", tmp_path))
    assert {(gpu.slot, gpu.device_id) for gpu in sysfs_gpus} == expected_gpus
    if shutil.which("lspci"):
        lspci_gpus = run_fact_here(facts.NvidiaPciGpus())
        assert {gpu.device_id for gpu in lspci_gpus} == {device for _, device in expected_gpus}
    smi = run_fact_here(facts.NvidiaSmi())
    assert smi.available is bool(shutil.which("nvidia-smi") or os.access(facts.WSL_NVIDIA_SMI, os.X_OK))
    proc_version = Path("/proc/driver/nvidia/version")
    loaded = run_fact_here(facts.DriverStateFact()).loaded
    assert loaded == (parse_proc_driver_version(proc_version.read_text()) if proc_version.exists() else None)
    assert run_fact_here(facts.MemoryInfo())["total"] > 0
    nearest = subprocess.run(["df", "-Pk", "/var/lib"], capture_output=True, text=True, check=True).stdout
    assert run_fact_here(facts.FreeDisk(), "/var/lib/gpufleet-test/not/there")["mount"] == parse_df(nearest)["mount"]
    secure_boot = run_fact_here(facts.SecureBoot())
    assert secure_boot is None if shutil.which("mokutil") is None else secure_boot in (True, False)
    assert run_fact_here(facts.KernelHeaders())["release"] == Path("/proc/sys/kernel/osrelease").read_text().strip()
