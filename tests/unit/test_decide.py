"""Decisions, as plain functions of facts and settings: which GPUs, which packages, and which hosts are refused."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpufleet.buildplan import max_jobs
from gpufleet.decide import (
    GB,
    DiskNeed,
    HostGpu,
    HostProfile,
    arch_list,
    cuda_driver_problem,
    cuda_repo_dir,
    disk_problems,
    driver_packages,
    host_gpus,
    may_reboot,
    preflight_problems,
    stale_driver_holds,
)
from gpufleet.facts import (
    DriverState,
    LoadedModule,
    OsRelease,
    PciGpu,
    SmiGpu,
    SmiResult,
)
from gpufleet.settings import load_settings

UBUNTU_2404 = OsRelease("ubuntu", "24.04", "noble", "Ubuntu 24.04.3 LTS")
UBUNTU_2204 = OsRelease("ubuntu", "22.04", "jammy", "Ubuntu 22.04.5 LTS")
DEBIAN_12 = OsRelease("debian", "12", "bookworm", "Debian GNU/Linux 12 (bookworm)")

PCI_5090D = PciGpu("01:00.0", "2b87", "NVIDIA Corporation Device")
PCI_5090DV2 = PciGpu("01:00.0", "2b8c", "NVIDIA Corporation Device")
PCI_H100 = PciGpu("41:00.0", "2330", "NVIDIA Corporation GH100[H100 SXM5 80GB]")
PCI_UNKNOWN = PciGpu("02:00.0", "2bff", "NVIDIA Corporation Device")
SMI_5090D = SmiGpu("NVIDIA GeForce RTX 5090 D", "2b87", "12.0", "580.95.05")
NO_SMI = SmiResult(available=False)

GPU_5090D = HostGpu("2b87", "NVIDIA GeForce RTX 5090 D", "12.0", True)
GPU_5090DV2 = HostGpu("2b8c", "NVIDIA GeForce RTX 5090 D v2", "12.0", True)
GPU_H100 = HostGpu("2330", "NVIDIA H100 80GB HBM3", "9.0", False)

OPEN_580 = LoadedModule("580.95.05", open=True)
PROPRIETARY_570 = LoadedModule("570.195.03", open=False)
NO_DRIVER = DriverState(None, None)


def defaults() -> dict:
    return {name: setting.default for name, setting in load_settings().items()}


# A checksum for every repository, as an inventory for Debian 12 or WSL hosts must pin (all.py pins ubuntu2404 only).
PINNED_KEYRINGS = {"ubuntu2404": "a" * 64, "wsl-ubuntu": "b" * 64, "debian12": "c" * 64}


def settings(**overrides) -> dict:
    return {**defaults(), "cuda_keyring_sha256": PINNED_KEYRINGS, **overrides}


def workstation(**changes) -> HostProfile:
    """A fresh Ubuntu 24.04 workstation with one 5090 D and no driver: nothing to refuse."""
    host = HostProfile(
        name="ws01",
        group="workstations",
        os=UBUNTU_2404,
        is_wsl=False,
        gpus=[GPU_5090D],
        smi=NO_SMI,
        driver=NO_DRIVER,
        lspci_missing=False,
        secure_boot=False,
        mem_total=64 * GB,
        mem_available=60 * GB,
        cpus=16,
        free_disk=500 * GB,
        disk_mount="/",
        is_control_machine=False,
    )
    return replace(host, **changes)


def wsl_host(**changes) -> HostProfile:
    """Ubuntu 24.04 under WSL2: lspci sees no NVIDIA device, Windows' nvidia-smi sees the 5090 D."""
    smi = SmiResult(available=True, gpus=(SMI_5090D,))
    base = workstation(name="desk-07", group="wsl", is_wsl=True, smi=smi, gpus=host_gpus([], smi))
    return replace(base, **changes)


def only(problems: list[str], *fragments: str) -> str:
    assert len(problems) == 1, problems
    for fragment in fragments:
        assert fragment in problems[0]
    return problems[0]


def test_5090_d_is_found_by_pci_id_without_a_driver():
    assert host_gpus([PCI_5090D], NO_SMI) == [GPU_5090D]


def test_5090_d_v2_is_named_from_its_pci_id():
    assert host_gpus([PCI_5090DV2], NO_SMI) == [GPU_5090DV2]


def test_h100_is_found_by_pci_id_and_is_not_blackwell():
    assert host_gpus([PCI_H100], NO_SMI) == [GPU_H100]


def test_pci_gpus_are_not_repeated_from_nvidia_smi():
    assert host_gpus([PCI_5090D], SmiResult(True, (SMI_5090D,))) == [GPU_5090D]


def test_wsl_gpus_come_from_nvidia_smi_when_lspci_sees_none():
    assert host_gpus([], SmiResult(True, (SMI_5090D,))) == [GPU_5090D]


def test_missing_lspci_falls_back_to_nvidia_smi():
    assert host_gpus(None, SmiResult(True, (SMI_5090D,))) == [GPU_5090D]


def test_unknown_pci_id_takes_compute_capability_from_nvidia_smi():
    smi = SmiResult(True, (SmiGpu("NVIDIA RTX PRO 6000", "2bff", "12.0", "580.95.05"),))
    assert host_gpus([PCI_UNKNOWN], smi) == [HostGpu("2bff", "NVIDIA Corporation Device", "12.0", True)]


def test_unknown_pci_id_without_driver_has_no_compute_capability():
    assert host_gpus([PCI_UNKNOWN], NO_SMI) == [HostGpu("2bff", "NVIDIA Corporation Device", None, False)]


def test_no_pci_gpu_and_no_smi_is_no_gpu():
    assert host_gpus([], NO_SMI) == []


def test_arch_list_sorts_by_version_not_text_and_drops_repeats():
    unknown = HostGpu("2bff", "?", None, False)
    assert arch_list([GPU_5090D, GPU_H100, GPU_5090DV2, unknown]) == ["9.0", "12.0"]


def test_arch_list_of_no_gpus_is_empty():
    assert arch_list([]) == []


@pytest.mark.parametrize(
    "os_release, is_wsl, directory",
    [(UBUNTU_2404, False, "ubuntu2404"), (UBUNTU_2404, True, "wsl-ubuntu"), (DEBIAN_12, False, "debian12")],
    ids=["ubuntu2404", "wsl", "debian12"],
)
def test_cuda_repo_dir_per_os(os_release, is_wsl, directory):
    assert cuda_repo_dir(os_release, is_wsl) == directory


@pytest.mark.parametrize(
    "source, branch, flavour, packages",
    [
        ("nvidia", "580", "open", ["nvidia-open-580"]),
        ("nvidia", "575", "open", ["nvidia-open-575"]),
        ("nvidia", "570", "open", ["nvidia-open-570"]),
        ("nvidia", "590", "open", ["nvidia-driver-pinning-590", "nvidia-open"]),
        ("nvidia", "595", "open", ["nvidia-driver-pinning-595", "nvidia-open"]),
        ("nvidia", "580", "proprietary", ["cuda-drivers-580"]),
        ("nvidia", "590", "proprietary", ["nvidia-driver-pinning-590", "cuda-drivers"]),
        ("ubuntu", "580", "open", ["nvidia-driver-580-open", "linux-modules-nvidia-580-open-generic"]),
        ("ubuntu", "580", "proprietary", ["nvidia-driver-580", "linux-modules-nvidia-580-generic"]),
    ],
)
def test_driver_packages(source, branch, flavour, packages):
    assert driver_packages(source, branch, flavour) == packages


@pytest.mark.parametrize("branch", ["570", "575", "580", "590"])
def test_open_flavour_never_installs_cuda_drivers(branch):
    for source in ("nvidia", "ubuntu"):
        assert not any(p.startswith("cuda-drivers") for p in driver_packages(source, branch, "open"))


@pytest.mark.parametrize(
    "available_gb, cpus, jobs",
    [(60, 16, 16), (10, 16, 3), (2, 16, 1), (0, 4, 1), (100, 2, 2), (9, 64, 3)],
)
def test_max_jobs_fits_about_3_gb_a_job_within_the_cpus(available_gb, cpus, jobs):
    assert max_jobs(available_gb * GB, cpus) == jobs


def test_max_jobs_takes_another_per_job_budget():
    assert max_jobs(12 * GB, 16, per_job_gb=2.0) == 6


def test_fresh_ubuntu_workstation_with_5090_d_passes_preflight():
    assert preflight_problems(workstation(), settings()) == []


def test_wsl_host_with_windows_driver_passes_preflight():
    assert preflight_problems(wsl_host(), settings(reboot_policy="never")) == []


def test_debian_12_with_python_3_11_passes_preflight():
    assert preflight_problems(workstation(os=DEBIAN_12), settings(python_version="3.11")) == []


def test_ubuntu_22_04_is_not_supported():
    only(preflight_problems(workstation(os=UBUNTU_2204), settings()), "Ubuntu 22.04.5 LTS is not supported", "Ubuntu 24.04")


def test_wsl_with_debian_is_refused():
    problems = preflight_problems(wsl_host(os=DEBIAN_12), settings(python_version="3.11"))
    only(problems, "WSL2 is supported with Ubuntu 24.04 only")


def test_host_in_wsl_group_that_is_not_wsl_is_refused():
    only(preflight_problems(workstation(group="wsl"), settings()), "move it to the workstations group")


def test_missing_lspci_says_install_pciutils_and_not_no_gpu():
    problems = preflight_problems(workstation(lspci_missing=True, gpus=[]), settings())
    only(problems, "apt-get install pciutils")


def test_wsl_without_nvidia_smi_says_install_the_windows_driver():
    problems = preflight_problems(wsl_host(smi=NO_SMI, gpus=[]), settings())
    assert any("install the NVIDIA driver on Windows" in p and "wsl --shutdown" in p for p in problems)


def test_host_without_gpu_is_refused():
    only(preflight_problems(workstation(gpus=[]), settings()), "has no NVIDIA GPU")


def test_unknown_gpu_without_compute_capability_asks_for_arch_list():
    unknown = HostGpu("2bff", "NVIDIA Corporation Device", None, False)
    only(preflight_problems(workstation(gpus=[unknown]), settings()), "[10de:2bff]", "set xformers_arch_list")



def test_unknown_gpu_is_accepted_once_xformers_arch_list_is_set():
    unknown = HostGpu("2bff", "NVIDIA Corporation Device", None, False)
    assert preflight_problems(workstation(gpus=[unknown]), settings(xformers_arch_list=["12.0"])) == []


def test_proprietary_flavour_on_blackwell_is_refused():
    only(preflight_problems(workstation(), settings(driver_flavour="proprietary")), "set driver_flavour: open")


def test_proprietary_flavour_on_h100_is_allowed():
    assert preflight_problems(workstation(gpus=[GPU_H100]), settings(driver_flavour="proprietary")) == []


def test_proprietary_module_loaded_on_blackwell_is_refused_with_purge_steps():
    host = workstation(driver=DriverState(PROPRIETARY_570, "570.195.03"))
    only(preflight_problems(host, settings()), "proprietary NVIDIA kernel module 570.195.03", "apt-get purge", "reboot")


def test_open_module_loaded_on_blackwell_is_fine():
    assert preflight_problems(workstation(driver=DriverState(OPEN_580, "580.95.05")), settings()) == []


def test_5090_d_v2_on_branch_575_is_refused():
    host = workstation(gpus=[GPU_5090DV2])
    only(preflight_problems(host, settings(driver_branch="575")), "driver_branch '575'", "[10de:2b8c]", 'driver_branch: "580"')


def test_5090_d_v2_on_branch_580_passes():
    assert preflight_problems(workstation(gpus=[GPU_5090DV2]), settings(driver_branch="580")) == []


def test_5090_d_on_branch_575_passes():
    assert preflight_problems(workstation(), settings(driver_branch="575")) == []


def test_5090_d_on_a_branch_older_than_570_is_refused():
    only(preflight_problems(workstation(), settings(driver_branch="560")), "first supported: 570.86.16")


def test_wsl_host_ignores_driver_branch():
    assert preflight_problems(wsl_host(gpus=[GPU_5090DV2]), settings(driver_branch="575")) == []


def test_runfile_driver_is_refused_with_nvidia_uninstall():
    host = workstation(driver=DriverState(OPEN_580, "580.95.05", runfile=True))
    only(preflight_problems(host, settings()), "nvidia-uninstall", "driver_accept_existing: true")


def test_secure_boot_with_nvidia_source_is_refused():
    only(preflight_problems(workstation(secure_boot=True), settings()), "Secure Boot is on", "driver_source: ubuntu", "mokutil --import")


def test_secure_boot_with_ubuntu_signed_modules_passes():
    assert preflight_problems(workstation(secure_boot=True), settings(driver_source="ubuntu")) == []


def test_unknown_secure_boot_state_is_not_refused():
    assert preflight_problems(workstation(secure_boot=None), settings()) == []


def test_ubuntu_driver_source_on_debian_is_refused():
    host = workstation(os=DEBIAN_12)
    only(preflight_problems(host, settings(driver_source="ubuntu", python_version="3.11")), "set driver_source: nvidia")


def test_debian_with_python_3_12_and_no_interpreter_is_refused():
    only(preflight_problems(workstation(os=DEBIAN_12), settings()), "Debian 12's Python is 3.11", "python_interpreter")


def test_debian_with_python_3_12_and_an_interpreter_passes():
    host = workstation(os=DEBIAN_12)
    assert preflight_problems(host, settings(python_interpreter="/usr/local/bin/python3.12")) == []


def test_debian_adopting_an_existing_venv_passes():
    assert preflight_problems(workstation(os=DEBIAN_12), settings(venv_adopt=True)) == []


def test_low_disk_names_the_mount_and_the_setting():
    problems = preflight_problems(workstation(free_disk=12 * GB, disk_mount="/var"), settings())
    only(problems, "12.0 GB free on /var", "needs 30 GB", "min_free_disk_gb")


def test_low_memory_names_the_setting_and_wslconfig():
    only(preflight_problems(workstation(mem_available=3 * GB), settings()), "3.0 GB of memory", "min_memory_gb", ".wslconfig")


def test_accept_existing_without_a_loaded_driver_is_refused():
    only(preflight_problems(workstation(), settings(driver_accept_existing=True)), "no NVIDIA kernel module is loaded")


def test_accept_existing_driver_older_than_the_branch_is_refused():
    host = workstation(driver=DriverState(LoadedModule("575.64.05", True), "575.64.05"))
    only(preflight_problems(host, settings(driver_accept_existing=True)), "575.64.05 is older than driver_branch 580")


def test_accept_existing_open_driver_of_the_branch_passes():
    host = workstation(driver=DriverState(OPEN_580, "580.95.05", runfile=True))
    assert preflight_problems(host, settings(driver_accept_existing=True)) == []


def test_accept_existing_proprietary_module_on_blackwell_is_reported_once():
    host = workstation(driver=DriverState(PROPRIETARY_570, "570.195.03"))
    only(preflight_problems(host, settings(driver_accept_existing=True)), "proprietary NVIDIA kernel module")


def test_every_problem_of_a_host_is_reported_together():
    host = workstation(os=DEBIAN_12, secure_boot=True, free_disk=1 * GB, mem_available=1 * GB, gpus=[GPU_5090DV2])
    problems = preflight_problems(host, settings(driver_branch="575", driver_flavour="proprietary"))
    fragments = ["driver_flavour: open", "driver_branch '575'", "Secure Boot", "Debian 12's Python", "min_free_disk_gb", "min_memory_gb"]
    assert len(problems) == len(fragments)
    for fragment, problem in zip(fragments, problems):
        assert fragment in problem


def test_cuda_12_8_on_driver_580_is_fine():
    assert cuda_driver_problem("12.8", "580.95.05") is None


def test_cuda_12_8_on_driver_570_26_is_fine():
    assert cuda_driver_problem("12.8", "570.26") is None


def test_cuda_12_8_on_driver_560_names_both_versions_and_the_fix():
    problem = cuda_driver_problem("12.8", "560.35.03")
    assert problem is not None
    assert "CUDA 12.8 needs driver 570.26" in problem and "560.35.03" in problem and "driver_branch" in problem


def test_cuda_13_0_on_driver_575_is_refused():
    assert cuda_driver_problem("13.0", "575.64.05") is not None


def test_unknown_cuda_version_or_driver_is_not_judged():
    assert cuda_driver_problem("12.6", "520.61.05") is None
    assert cuda_driver_problem("12.8", None) is None


def test_bare_metal_host_may_reboot_when_policy_is_auto():
    assert may_reboot(workstation(), settings(reboot_policy="auto")) is True


def test_reboot_policy_never_is_respected():
    assert may_reboot(workstation(), settings(reboot_policy="never")) is False


def test_wsl_host_never_reboots():
    assert may_reboot(wsl_host(), settings(reboot_policy="auto")) is False


def test_control_machine_never_reboots():
    assert may_reboot(workstation(is_control_machine=True), settings(reboot_policy="auto")) is False


def test_repository_without_a_pinned_keyring_checksum_is_refused_with_where_and_how():
    problems = preflight_problems(wsl_host(), settings(reboot_policy="never", cuda_keyring_sha256={}))
    (problem,) = problems
    assert "cuda_keyring_sha256 has no checksum for NVIDIA's 'wsl-ubuntu' repository" in problem
    assert "/wsl-ubuntu/x86_64/cuda-keyring_1.1-1_all.deb" in problem
    assert "{wsl-ubuntu: <sha256>" in problem


def test_existing_toolkit_and_driver_need_no_keyring_checksum():
    config = settings(cuda_keyring_sha256={}, driver_accept_existing=True, cuda_existing_home="/usr/local/cuda-13.0",
                      cuda_version="13.0")
    host = workstation(driver=DriverState(LoadedModule("580.159.04", True), None))
    assert not any("cuda_keyring_sha256" in p for p in preflight_problems(host, config))


def test_holds_of_the_same_branch_are_never_released():
    packages = {"nvidia-open-580": "580.95.05-1", "nvidia-dkms-580-open": "580.95.05-1", "nvidia-utils-580": "580.95.05-1"}
    assert stale_driver_holds(packages, set(packages), "580") == []


def test_holds_of_the_previous_branch_are_released_on_a_branch_change():
    packages = {"nvidia-open-575": "575.57.08-1", "libnvidia-compute-575": "575.57.08-1", "nvidia-kernel-common": "1:580.1"}
    held = {"nvidia-open-575", "libnvidia-compute-575"}
    assert stale_driver_holds(packages, held, "580") == ["libnvidia-compute-575", "nvidia-open-575"]


def test_unversioned_packages_count_by_their_version_major():
    packages = {"nvidia-open": "590.44.01-1", "nvidia-driver-pinning-590": "1.0"}
    assert stale_driver_holds(packages, set(packages), "590") == []
    assert stale_driver_holds(packages, set(packages), "600") == ["nvidia-driver-pinning-590", "nvidia-open"]


def wsl_with_windows_driver(version: str) -> HostProfile:
    smi = SmiResult(available=True, gpus=(SmiGpu("NVIDIA GeForce RTX 5090 D", "2b87", "12.0", version),))
    return wsl_host(smi=smi, gpus=host_gpus([], smi))


def test_wsl_windows_driver_too_old_for_the_toolkit_is_refused_with_the_windows_update_as_the_fix():
    problem = only(preflight_problems(wsl_with_windows_driver("566.36"), settings()),
                   "the Windows NVIDIA driver is 566.36", "CUDA 12.8 needs 570.65 or newer",
                   "update the NVIDIA driver on Windows", "wsl --shutdown")
    assert "driver_branch" not in problem  # nothing inside WSL, no setting, can fix it


def test_wsl_windows_driver_at_the_windows_minimum_passes():
    # Windows numbers its drivers apart from Linux: 570.65 is CUDA 12.8's Windows minimum, above Linux's 570.26.
    assert preflight_problems(wsl_with_windows_driver("570.65"), settings()) == []
    assert preflight_problems(wsl_with_windows_driver("570.64"), settings()) != []


def test_wsl_windows_driver_is_not_judged_where_nvidia_lists_no_windows_minimum():
    config = settings(cuda_version="13.0")
    assert not [p for p in preflight_problems(wsl_with_windows_driver("566.36"), config) if "Windows NVIDIA" in p]


def test_wsl_windows_driver_version_nvidia_smi_cannot_print_is_not_judged():
    assert preflight_problems(wsl_with_windows_driver("[N/A]"), settings()) == []


def test_accepted_existing_driver_too_old_for_the_toolkit_is_refused_by_preflight():
    host = workstation(driver=DriverState(LoadedModule("580.20.01", True), "580.20.01"))
    only(preflight_problems(host, settings(driver_accept_existing=True, cuda_version="13.0")),
         "CUDA 13.0 needs driver 580.65.06", "580.20.01")


def test_driver_gpufleet_installs_is_not_judged_against_the_toolkit_before_the_install():
    host = workstation(driver=DriverState(LoadedModule("560.35.03", True), "560.35.03"))
    assert not [p for p in preflight_problems(host, settings()) if "CUDA 12.8 needs" in p]


def test_each_stage_s_disk_need_is_checked_where_it_writes():
    needs = (
        DiskNeed("/var/lib/gpufleet", "/var/lib/gpufleet", int(0.5 * GB), 6, "pip's cache and the xformers build"),
        DiskNeed("/opt/gpufleet/venv", "/", 200 * GB, 8, "torch and its CUDA libraries"),
        DiskNeed("/usr/local", "/", 200 * GB, 8, "the CUDA 12.8 toolkit"),
    )
    problems = preflight_problems(workstation(disk_needs=needs), settings(min_free_disk_gb=10))
    only(problems, "0.5 GB free on /var/lib/gpufleet", "needs 10 GB", "/var/lib/gpufleet (pip's cache", "6 GB")


def test_stages_sharing_a_filesystem_add_up_their_needs():
    needs = (
        DiskNeed("/opt/gpufleet/venv", "/", 15 * GB, 8, "torch and its CUDA libraries"),
        DiskNeed("/usr/local", "/", 15 * GB, 8, "the CUDA 12.8 toolkit"),
    )
    only(disk_problems(needs, 10), "15.0 GB free on /", "needs 16 GB", "/usr/local (the CUDA 12.8 toolkit, 8 GB)")
    assert disk_problems(needs, 10)[0].count("GB free") == 1


def test_a_converged_host_needs_only_the_floor():
    needs = (DiskNeed("/var/lib/gpufleet", "/", 12 * GB, 0, "pip's cache and the xformers build"),)
    assert disk_problems(needs, 10) == []
    only(disk_problems(needs, 30), "12.0 GB free on /", "needs 30 GB", "min_free_disk_gb (30 GB)")
