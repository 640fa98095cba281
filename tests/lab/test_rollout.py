"""`gpufleet rollout` on lab hosts: a driver branch change 580 -> 595, canary first, batches health-gated.

What is real: the `gpufleet rollout` command, which runs the real pyinfra CLI per batch over SSH; apt, dpkg and
apt-mark on Debian 12 hosts; the branch change itself, which goes through apt because the STAND-IN driver packages
carry Conflicts/Replaces/Provides as NVIDIA's do (gpufleet_lab/standins.py: 580's versioned names, 595's unversioned
nvidia-open beside nvidia-driver-pinning-595, published to the lab's NVIDIA mirror after the hosts converged on 580).
What is a stand-in, and why:
- the health gate: the lab cannot run CUDA, so tests/lab/deploys/rollout_stack.py runs a STAND-IN health check in the
  smoke stage's place that writes a smoke-format result and fails on demand (/etc/gpufleet-lab/health-fault); the
  real smoke test as the gate is run on the lent GPU host;
- the reboot: a lab host cannot reboot, so it gets a STAND-IN `reboot` (Lab.install_standin_reboot) that loads the
  module on disk and lowers /proc/uptime; reboot_policy: auto and pyinfra's server.reboot run for real against it;
- nvidia-smi: a STAND-IN that reports the compute processes a test sets (Lab.set_compute_apps).
"""

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from gpufleet_lab import Lab
from gpufleet_lab.hosts import Host
from gpufleet_lab.runner import REPO_ROOT, PyinfraRun

pytestmark = pytest.mark.lab

STACK = Path(__file__).parent / "deploys" / "rollout_stack.py"
# 595 is served by the rollout's own stand-ins; the 580 version is whatever the shared lab serves newest (another
# test may have published a driver update to it), read from the host once it converged.
NEW = "595.45.04"
FAULT = "/etc/gpufleet-lab/health-fault"


@pytest.fixture
def standin_hosts(lab: Lab) -> Iterator[Callable[[int], list[Host]]]:
    """New lab hosts with the stand-in reboot, removed after the test."""
    created: list[Host] = []

    def make(count: int) -> list[Host]:
        new = lab.add_hosts(count)
        created.extend(new)
        for host in new:
            lab.install_standin_reboot(host)
        return new
    yield make
    for host in created:
        lab.remove_host(host)


def write_inventory(make_inventory: Callable[..., Path], hosts: list[Host], reports: Path, **settings) -> Path:
    path = make_inventory(hosts, kind="yaml")
    document = yaml.safe_load(path.read_text())
    document["settings"].update({"reboot_policy": "auto", "min_free_disk_gb": 10, "report_dir": str(reports),
                                 **settings})
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def gpufleet_rollout(inventory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "400",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "gpufleet.cli", "rollout", str(inventory), "--deploy", str(STACK),
                           *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False)


def driver_state(lab: Lab, host: Host) -> dict[str, str]:
    """Installed driver packages with versions, the held ones, and the loaded module's version."""
    query = lab.ssh(host, "dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\\n' 'nvidia-*' 2>/dev/null")
    rows = [line.split() for line in query.stdout.splitlines()]
    installed = {p[0]: p[1] for p in rows if len(p) == 3 and p[2][1] == "i"}
    held = lab.ssh(host, "apt-mark showhold").stdout.split()
    loaded = lab.ssh(host, "cat /proc/driver/nvidia/version").stdout
    return {**installed, "held": " ".join(sorted(held)), "loaded": loaded}


def version_580(state: dict[str, str]) -> str:
    """The installed 580 driver's upstream version ("580.95.05" of package version "580.95.05-1"), or ""."""
    return state.get("nvidia-open-580", "").rsplit("-", 1)[0]


def on_580(state: dict[str, str]) -> bool:
    old = version_580(state)
    return (old.startswith("580.") and "nvidia-open" not in state
            and "nvidia-open-580" in state["held"] and f" {old} " in state["loaded"])


def on_595(state: dict[str, str]) -> bool:
    return (state.get("nvidia-open") == f"{NEW}-1" and state.get("nvidia-dkms-open") == f"{NEW}-1"
            and not any(name.endswith(("-580", "-580-open")) for name in state)
            and {"nvidia-open", "nvidia-driver-pinning-595"} <= set(state["held"].split())
            and f" {NEW} " in state["loaded"])


def converge_on_580(lab: Lab, hosts: list[Host], inventory: Path, run_pyinfra: Callable[..., PyinfraRun]) -> None:
    run_pyinfra(inventory, STACK).assert_converged([h.name for h in hosts])
    for host in hosts:
        assert on_580(driver_state(lab, host)), f"{host.name}: {driver_state(lab, host)}"
        assert lab.reboots(host) == 1


def test_rollout_580_to_595_stops_at_a_failed_health_gate_and_a_rerun_finishes_it(
        lab: Lab, standin_hosts: Callable[[int], list[Host]], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun], tmp_path: Path) -> None:
    six_hosts = standin_hosts(6)
    names = [h.name for h in six_hosts]
    reports = tmp_path / "reports"
    converge_on_580(lab, six_hosts, write_inventory(make_inventory, six_hosts, reports), run_pyinfra)

    lab.publish_driver(f"{NEW}-1", branch="595")
    inventory = write_inventory(make_inventory, six_hosts, reports, driver_branch="595")
    # canary: host 0; batch 1: hosts 1-2; batch 2: hosts 3-4 (host 3 fails its gate); batch 3: host 5.
    faulty, untouched = six_hosts[3], six_hosts[5]
    assert lab.ssh(faulty, f"mkdir -p {Path(FAULT).parent} && echo matmul > {FAULT}").returncode == 0
    stopped = gpufleet_rollout(inventory, "--canary", "1", "--batch", "2")
    assert stopped.returncode == 1, stopped.stderr
    assert (f"rollout stopped at the batch 2: {faulty.name}: health gate: smoke test failed at rung matmul"
            in stopped.stderr), stopped.stderr
    assert "converged 4, skipped (already converged) 0, failed 1, reboot pending 0, still to do 1" in stopped.stderr
    for host in six_hosts[:5]:
        assert on_595(driver_state(lab, host)), f"{host.name}: {driver_state(lab, host)}"
        assert lab.reboots(host) == 2, "one reboot for 580, one for 595"
    assert on_580(driver_state(lab, untouched)), f"batch 3 was touched: {driver_state(lab, untouched)}"
    assert lab.reboots(untouched) == 1

    assert lab.ssh(faulty, f"rm {FAULT}").returncode == 0
    finished = gpufleet_rollout(inventory, "--canary", "1", "--batch", "2")
    assert finished.returncode == 0, finished.stderr
    assert "converged 2, skipped (already converged) 4, failed 0, reboot pending 0, still to do 0" in finished.stderr
    for host in six_hosts:
        assert on_595(driver_state(lab, host)), f"{host.name}: {driver_state(lab, host)}"
    assert lab.reboots(faulty) == 2, "the fixed host was not rebooted again"
    run_pyinfra(inventory, STACK).assert_no_changes(names)


def test_busy_host_is_not_rebooted_and_the_rollout_counts_it_pending(
        lab: Lab, standin_hosts: Callable[[int], list[Host]], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun], tmp_path: Path) -> None:
    hosts = standin_hosts(1)
    host = hosts[0]
    reports = tmp_path / "reports"
    converge_on_580(lab, hosts, write_inventory(make_inventory, hosts, reports), run_pyinfra)
    lab.publish_driver(f"{NEW}-1", branch="595")
    lab.set_compute_apps(host, [(4242, "python3", 20480)])
    inventory = write_inventory(make_inventory, hosts, reports, driver_branch="595")
    pending = gpufleet_rollout(inventory)
    assert pending.returncode == 1, pending.stderr
    assert "reboot pending: the NVIDIA driver was installed or changed" in pending.stderr, pending.stderr
    assert "GPU compute processes: python3 (pid 4242)" in pending.stderr, pending.stderr
    assert "reboot pending 1, still to do 0" in pending.stderr, pending.stderr
    state = driver_state(lab, host)
    assert state.get("nvidia-open") == f"{NEW}-1" and re.search(r" 580\.\d+\.\d+ ", state["loaded"]), state
    assert lab.reboots(host) == 1, "a busy host was rebooted"

    lab.set_compute_apps(host, [])
    done = gpufleet_rollout(inventory)
    assert done.returncode == 0, done.stderr
    assert on_595(driver_state(lab, host)) and lab.reboots(host) == 2


NEW_KERNEL = "6.18.99-gpufleet-lab"


def test_new_kernel_installed_without_headers_gets_them_and_its_module_and_nothing_reboots(
        lab: Lab, standin_hosts: Callable[[int], list[Host]], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun], tmp_path: Path) -> None:
    """A STAND-IN kernel package (linux-image-<release>: /boot/vmlinuz and its /lib/modules tree) installed by apt
    without headers, as unattended-upgrades does; the stand-in dkms builds by copying the module object."""
    host = standin_hosts(1)[0]
    inventory = write_inventory(make_inventory, [host], tmp_path / "reports")
    converge_on_580(lab, [host], inventory, run_pyinfra)
    old = version_580(driver_state(lab, host))
    lab.publish_kernel(NEW_KERNEL)
    by_apt = lab.ssh(host, "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                           f"linux-image-{NEW_KERNEL}")
    assert by_apt.returncode == 0, by_apt.stderr
    assert lab.ssh(host, f"test -e /lib/modules/{NEW_KERNEL}/build").returncode == 1, "headers came with the kernel"

    run = run_pyinfra(inventory, STACK)
    run.assert_converged([host.name])
    changes = " / ".join(run.changes(host.name))
    assert f"Install the headers of every installed kernel ({NEW_KERNEL})" in changes, changes
    assert f"Build the NVIDIA module for kernel {NEW_KERNEL} (dkms autoinstall)" in changes, changes
    assert lab.ssh(host, f"modinfo -k {NEW_KERNEL} -F version nvidia").stdout.strip() == old
    assert lab.reboots(host) == 1, "a kernel update alone rebooted the host"
    run_pyinfra(inventory, STACK).assert_no_changes([host.name])
