"""WSL2 hosts next to a bare-metal host through preflight, driver, CUDA and Python: the real pyinfra CLI over SSH.

A lab WSL host (Lab.add_host(platform="wsl"), gpufleet_lab/hardware.py) is a Debian 12 host that shows the deploys
what WSL2 shows: the WSL2 kernel release, Microsoft's render device and no NVIDIA PCI device, no /proc/driver/nvidia,
Ubuntu 24.04's os-release, and a STAND-IN for Windows' nvidia-smi at /usr/lib/wsl/lib (off PATH) whose reported
driver version the test sets (Lab.set_windows_driver). NVIDIA's packages are STAND-INS from the lab's signed
repositories, laid out like NVIDIA's (debian12, ubuntu2404, wsl-ubuntu, each with its own pinned keyring checksum);
every one of them also serves the driver packages and the `cuda`, `cuda-12-8` and `cuda-drivers` metapackages, so a
deploy that installed one inside WSL would be caught here. apt, dpkg, sshd, bash, pip and venv are real.

The hosts get recorders for `update-initramfs` and `reboot` (the lab base has neither), so "no initramfs rebuild"
and "no reboot" are read from the host; on the bare-metal host the recorder sees the driver stage's rebuild. A lab
host cannot reboot: the bare-metal host runs with reboot_policy: never, and its reboot is simulated by loading the
installed module (Lab.set_loaded_driver); the WSL hosts keep reboot_policy: auto, so only gpufleet's WSL rule keeps
them from rebooting. That the smoke test runs again after a Windows driver update (the lab cannot run CUDA) is
covered by tests/unit/test_smoke_stamp.py; MAX_JOBS from a .wslconfig-capped VM by tests/plan (wsl2-ubuntu2404-8gb-vm).
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gpufleet_lab import Lab
from gpufleet_lab.hosts import Host, wait_ready
from gpufleet_lab.paths import mirror_base_url
from gpufleet_lab.runner import PyinfraRun
from gpufleet_lab.runner import run_pyinfra as _run_pyinfra

pytestmark = pytest.mark.lab

STACK = Path(__file__).parent / "deploys" / "system_stack.py"
RECORDED = "/var/log/gpufleet-lab-recorded"
RECORDERS = ("update-initramfs", "reboot")
# What must never be on a WSL host: a Linux driver, the metapackages that pull one, kernel headers for DKMS.
FORBIDDEN_ON_WSL = ("nvidia-*", "libnvidia-*", "linux-modules-nvidia-*", "cuda", "cuda-12-8", "cuda-drivers*",
                    "linux-headers-*")
NEWER_WINDOWS_DRIVER = "591.44"
OLD_WINDOWS_DRIVER = "566.36"  # CUDA 12.7's time; CUDA 12.8 needs 570.65 on Windows


@dataclass
class Fleet:
    wsl: list[Host]
    metal: Host
    inventory: Path
    runs: list[PyinfraRun]

    @property
    def names(self) -> list[str]:
        return [h.name for h in (*self.wsl, self.metal)]


def ok(lab: Lab, host: Host, command: str) -> str:
    result = lab.ssh(host, command)
    assert result.returncode == 0, (f"{host.name}: `{command}` failed ({result.returncode}):\n"
                                    f"{result.stderr}{result.stdout}")
    return result.stdout


def install_recorders(lab: Lab, host: Host) -> None:
    """/usr/local/sbin (first on root's PATH) gets commands that only note that they were called."""
    for command in RECORDERS:
        ok(lab, host, f"printf '#!/bin/sh\\necho \"{command} $*\" >> {RECORDED}\\n' > /usr/local/sbin/{command} "
                      f"&& chmod 755 /usr/local/sbin/{command}")


def installed(dpkg_query: str) -> set[str]:
    """Packages `dpkg-query -W -f '${Package} ${db:Status-Abbrev}\\n'` lists as present (anything but not-installed)."""
    return {line.split()[0] for line in dpkg_query.splitlines() if len(line.split()) > 1 and line.split()[1][1] != "n"}


def recorded(lab: Lab, host: Host) -> str:
    return lab.ssh(host, f"cat {RECORDED} 2>/dev/null").stdout


def write_inventory(lab: Lab, path: Path, hosts: list[Host], metal: Host | None) -> Path:
    """The lab's YAML inventory (wsl group for WSL hosts; every keyring checksum pinned, wsl-ubuntu's included)."""
    lab.write_inventory_yaml(path, hosts)
    document = yaml.safe_load(path.read_text())
    assert set(document["settings"]["cuda_keyring_sha256"]) >= {"wsl-ubuntu", "debian12"}
    document["settings"].update({"reboot_policy": "auto", "min_free_disk_gb": 10})
    if metal is not None:
        document["groups"]["workstations"]["hosts"][metal.name]["settings"] = {"reboot_policy": "never"}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def refused(run: PyinfraRun, name: str, text: str) -> bool:
    """Whether the run stopped host `name` with a gpufleet refusal containing text (read from pyinfra's log, which
    is all there is when every host failed)."""
    return any(line.strip().startswith(f"[{name}] gpufleet refuses this host:") and text in line
               for line in run.stderr.splitlines())


def operations(run: PyinfraRun, name: str) -> list[str]:
    return [op.name for op in run.hosts.get(name, [])]


@pytest.fixture(scope="module")
def fleet(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """2 WSL hosts and 1 bare-metal host taken through preflight..python: the first run, the bare-metal host's
    reboot, the run that finishes it, and a run that must change nothing."""
    wsl = [lab.add_host(platform="wsl", wait=False) for _ in range(2)]
    metal = lab.add_host(wait=False)
    hosts = [*wsl, metal]
    try:
        for host in hosts:
            wait_ready(host)
            install_recorders(lab, host)
        inventory = write_inventory(lab, tmp_path_factory.mktemp("wsl-fleet") / "inventory.yaml", hosts, metal)
        first = _run_pyinfra(inventory, STACK)
        lab.set_loaded_driver(metal, ok(lab, metal, "modinfo -F version nvidia").strip())  # the reboot
        second = _run_pyinfra(inventory, STACK)
        third = _run_pyinfra(inventory, STACK)
        yield Fleet(wsl, metal, inventory, [first, second, third])
    finally:
        for host in hosts:
            lab.remove_host(host)


def test_wsl_hosts_converge_in_one_run_beside_a_bare_metal_host_and_a_rerun_changes_nothing_anywhere(
        fleet: Fleet) -> None:
    first, second, third = fleet.runs
    wsl_names = [h.name for h in fleet.wsl]
    first.assert_converged(wsl_names)
    assert refused(first, fleet.metal.name, "the NVIDIA driver was installed or changed"), first.explain()
    second.assert_no_changes(wsl_names)
    second.assert_converged([fleet.metal.name])
    third.assert_no_changes(fleet.names)


def test_bare_metal_host_beside_them_converges_as_usual(lab: Lab, fleet: Fleet) -> None:
    host = fleet.metal
    held = ok(lab, host, "apt-mark showhold").split()
    assert "nvidia-open-580" in held and "nvidia-dkms-580-open" in held, held
    assert ok(lab, host, "modinfo -F version nvidia").strip().startswith("580.")
    assert "blacklist nouveau" in ok(lab, host, "cat /etc/modprobe.d/gpufleet-blacklist-nouveau.conf")
    assert "update-initramfs -u" in recorded(lab, host)  # the recorder works: the driver stage's rebuild is seen
    assert "/cuda/repos/debian12/x86_64/" in ok(lab, host, "cat /etc/apt/sources.list.d/gpufleet-cuda.sources")
    assert "release 12.8" in ok(lab, host, "bash -lc 'nvcc --version'")


def test_wsl_hosts_get_no_driver_no_nouveau_blacklist_no_initramfs_rebuild_no_hold_and_no_reboot(
        lab: Lab, fleet: Fleet) -> None:
    patterns = " ".join(f"'{p}'" for p in FORBIDDEN_ON_WSL)
    for host in fleet.wsl:
        listed = lab.ssh(host, f"dpkg-query -W -f '${{Package}} ${{db:Status-Abbrev}}\\n' {patterns}").stdout
        assert installed(listed) == set(), f"{host.name}: {installed(listed)}"
        assert ok(lab, host, "grep -rl nouveau /etc/modprobe.d 2>/dev/null || true").strip() == ""
        assert ok(lab, host, "apt-mark showhold").strip() == ""
        assert lab.ssh(host, "test -e /etc/apt/apt.conf.d/51gpufleet-driver-hold").returncode == 1
        assert recorded(lab, host) == "", f"{host.name} ran {recorded(lab, host)!r}"
        assert lab.ssh(host, "test -e /proc/driver/nvidia").returncode == 1  # still no Linux module
        for run in fleet.runs:
            assert not [n for n in operations(run, host.name) if "eboot" in n or "nouveau" in n or "Hold" in n]


def test_windows_nvidia_smi_is_found_through_gpufleets_profile_in_a_login_shell(lab: Lab, fleet: Fleet) -> None:
    for host in fleet.wsl:
        assert "/usr/lib/wsl/lib" in ok(lab, host, "cat /etc/profile.d/gpufleet-wsl.sh")
        assert lab.ssh(host, "command -v nvidia-smi").returncode == 1  # not on PATH without the profile
        assert ok(lab, host, "bash -lc 'command -v nvidia-smi'").strip() == "/usr/lib/wsl/lib/nvidia-smi"
        query = "bash -lc 'nvidia-smi --query-gpu=name,driver_version --format=csv,noheader'"
        assert ok(lab, host, query).strip() == "NVIDIA GeForce RTX 5090 D, 581.57"


def test_wsl_hosts_take_only_cuda_toolkit_12_8_from_nvidias_wsl_ubuntu_repository(lab: Lab, fleet: Fleet) -> None:
    repo = f"{mirror_base_url()}/cuda/repos/wsl-ubuntu/x86_64/"
    for host in fleet.wsl:
        source = ok(lab, host, "cat /etc/apt/sources.list.d/gpufleet-cuda.sources")
        assert f"URIs: {repo}" in source and "Signed-By: /usr/share/keyrings/cuda-archive-keyring.gpg" in source
        assert ok(lab, host, "grep -rl cuda/repos /etc/apt/sources.list.d/").split() == [
            "/etc/apt/sources.list.d/gpufleet-cuda.sources"]
        # The host's own apt lists say what the repository offers; dpkg says which of those are installed.
        lists = ok(lab, host, "apt-get indextargets --format '$(FILENAME) $(URI)' 'Identifier: Packages'")
        (index,) = [line.split()[0] for line in lists.splitlines() if "/wsl-ubuntu/" in line]
        offered = set(ok(lab, host, f"/usr/lib/apt/apt-helper cat-file {index} | sed -n 's/^Package: //p'").split())
        assert {"cuda", "cuda-12-8", "cuda-drivers", "nvidia-open-580", "cuda-toolkit-12-8"} <= offered
        assert installed(ok(lab, host, "dpkg-query -W -f '${Package} ${db:Status-Abbrev}\\n'")) & offered == {
            "cuda-toolkit-12-8"}
        policy = ok(lab, host, "apt-cache policy cuda-toolkit-12-8")
        installed_from = policy.split("*** 12.8.1-1", 1)[1].splitlines()[1]
        assert "/cuda/repos/wsl-ubuntu/x86_64" in installed_from, policy
        assert "release 12.8" in ok(lab, host, "bash -lc 'nvcc --version'")
        venv = ok(lab, host, "stat -c %U /opt/gpufleet/venv; /opt/gpufleet/venv/bin/python -m pip list")
        assert venv.startswith("gpufleet\n") and "ninja" in venv, venv


def test_windows_driver_update_is_no_linux_mismatch_and_nothing_changes_or_reboots(lab: Lab, fleet: Fleet) -> None:
    host = fleet.wsl[0]
    lab.set_windows_driver(host, NEWER_WINDOWS_DRIVER)
    run = _run_pyinfra(fleet.inventory, STACK)
    run.assert_no_changes(fleet.names)  # nothing changed, so nothing rebooted or stopped on the bare-metal host
    for wsl in fleet.wsl:
        assert not [n for n in operations(run, wsl.name) if "eboot" in n or "Stop " in n], operations(run, wsl.name)
    assert "mismatch" not in run.stderr, run.explain()
    assert recorded(lab, host) == ""
    query = "bash -lc 'nvidia-smi --query-gpu=driver_version --format=csv,noheader'"
    assert ok(lab, host, query).strip() == NEWER_WINDOWS_DRIVER


def test_wsl_host_whose_windows_driver_is_too_old_for_cuda_is_refused_before_any_change(
        lab: Lab, tmp_path: Path, run_pyinfra: Callable[..., PyinfraRun]) -> None:
    host = lab.add_host(platform="wsl")
    try:
        lab.set_windows_driver(host, OLD_WINDOWS_DRIVER)
        inventory = write_inventory(lab, tmp_path / "inventory.yaml", [host], None)
        ok(lab, host, "touch /run/gpufleet-before && sleep 1.1")
        run = run_pyinfra(inventory, STACK)
        assert run.returncode != 0, run.explain()
        assert refused(run, host.name, f"the Windows NVIDIA driver is {OLD_WINDOWS_DRIVER} and CUDA 12.8 needs "
                                       "570.65 or newer; update the NVIDIA driver on Windows"), run.explain()
        assert refused(run, host.name, "wsl --shutdown"), run.explain()
        assert not run.changes(host.name), run.changes(host.name)
        changed = ok(lab, host, "find /etc /opt /usr /var/lib /var/cache/apt -newer /run/gpufleet-before "
                                "-not -type d -print")
        assert changed == "", f"{host.name} changed before the refusal:\n{changed}"
        for absent in ("/etc/profile.d/gpufleet-wsl.sh", "/etc/apt/sources.list.d/gpufleet-cuda.sources",
                       "/var/lib/gpufleet", "/opt/gpufleet"):
            assert lab.ssh(host, f"test -e {absent}").returncode == 1, absent
    finally:
        lab.remove_host(host)
