"""Real pyinfra runs against three lab hosts: convergence, idempotence, dropped connections, unreachable hosts.

The hosts are real Debian 12 systems over SSH; the NVIDIA packages they install are STAND-INS.
"""

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gpufleet_lab import Lab
from gpufleet_lab.hosts import Host
from gpufleet_lab.paths import SUBNET_PREFIX, mirror_base_url
from gpufleet_lab.rootfs import SUDO_USER
from gpufleet_lab.runner import PyinfraRun

MIRROR = mirror_base_url()

pytestmark = pytest.mark.lab

DEPLOYS = Path(__file__).parent / "deploys"


def test_deploy_converges_then_reruns_with_zero_changes_on_three_hosts(
        lab: Lab, fresh_hosts: list[Host], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun]) -> None:
    names = [h.name for h in fresh_hosts]
    inventory = make_inventory(fresh_hosts)
    first = run_pyinfra(inventory, DEPLOYS / "basic.py")
    first.assert_converged(names)
    assert all(first.changes(name) for name in names)
    for host in fresh_hosts:
        assert "release 12.8" in lab.ssh(host, "/usr/local/cuda-12.8/bin/nvcc --version").stdout
        assert lab.ssh(host, "dpkg-query -W tree cuda-toolkit-12-8").returncode == 0
    run_pyinfra(inventory, DEPLOYS / "basic.py").assert_no_changes(names)


def test_deploy_as_a_sudo_user_converges_then_reruns_with_zero_changes(
        lab: Lab, fresh_hosts: list[Host], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun]) -> None:
    names = [h.name for h in fresh_hosts]
    inventory = make_inventory(fresh_hosts, user=SUDO_USER)
    run_pyinfra(inventory, DEPLOYS / "basic.py").assert_converged(names)
    assert lab.ssh(fresh_hosts[0], "stat -c %U /etc/gpufleet-lab-test.conf").stdout.strip() == "root"
    run_pyinfra(inventory, DEPLOYS / "basic.py").assert_no_changes(names)


def test_yaml_inventory_through_root_inventory_converges_and_reruns_clean(
        fresh_hosts: list[Host], make_inventory: Callable[..., Path], run_pyinfra: Callable[..., PyinfraRun]) -> None:
    names = [h.name for h in fresh_hosts]
    inventory = make_inventory(fresh_hosts, kind="yaml")
    run_pyinfra(inventory, DEPLOYS / "basic.py").assert_converged(names)
    run_pyinfra(inventory, DEPLOYS / "basic.py").assert_no_changes(names)


def run_and_cut(lab: Lab, run_pyinfra: Callable[..., PyinfraRun], inventory: Path, deploy: Path,
                victim: Host, in_step: Callable[[str], bool], settle: float = 1.0) -> PyinfraRun:
    """Run pyinfra and, `settle` seconds after a process on `victim` matches `in_step`, kill that host's SSH
    sessions by PID."""
    outcome: list[PyinfraRun] = []
    runner = threading.Thread(target=lambda: outcome.append(run_pyinfra(inventory, deploy)))
    runner.start()
    deadline = time.monotonic() + 120
    while not any(in_step(cmd) for cmd in lab.processes(victim).values()):
        assert time.monotonic() < deadline and runner.is_alive(), f"the step never started on {victim.name}"
        time.sleep(0.05)
    time.sleep(settle)
    assert lab.cut_ssh_sessions(victim), f"no SSH session processes found on {victim.name}"
    runner.join(300)
    return outcome[0]


def test_connection_cut_mid_operation_is_repaired_by_the_next_run(
        lab: Lab, fresh_hosts: list[Host], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun]) -> None:
    names = [h.name for h in fresh_hosts]
    victim, others = fresh_hosts[0], names[1:]
    inventory = make_inventory(fresh_hosts)
    cut = run_and_cut(lab, run_pyinfra, inventory, DEPLOYS / "slow.py", victim,
                      lambda cmd: "payload.done" in cmd and "sleep" in cmd)
    assert victim.name in cut.failed_hosts or cut.errors(victim.name), cut.explain()
    cut.assert_converged(others)
    assert lab.ssh(victim, "cat /var/lib/gpufleet-lab-test/payload").stdout.strip() == "partial"

    repair = run_pyinfra(inventory, DEPLOYS / "slow.py")
    repair.assert_converged(names)
    assert repair.changes(victim.name) and not any(repair.changes(name) for name in others)
    assert lab.ssh(victim, "cat /var/lib/gpufleet-lab-test/payload").stdout.strip() == "complete"
    run_pyinfra(inventory, DEPLOYS / "slow.py").assert_no_changes(names)


def test_package_install_cut_mid_dpkg_is_finished_by_the_next_run(
        lab: Lab, make_inventory: Callable[..., Path], run_pyinfra: Callable[..., PyinfraRun]) -> None:
    host = lab.add_host()
    try:
        inventory = make_inventory([host])
        run_and_cut(lab, run_pyinfra, inventory, DEPLOYS / "packages.py", host,
                    lambda cmd: cmd.startswith("/usr/bin/dpkg") and "--unpack" in cmd)
        audit = lab.ssh(host, "find /var/lib/dpkg/updates -type f | head -n 1; dpkg --audit").stdout
        assert audit.strip(), "the cut came too late: dpkg finished cleanly, nothing to repair"
        repair = run_pyinfra(inventory, DEPLOYS / "packages.py")
        repair.assert_converged([host.name])
        assert "Finish the package installation a dropped connection interrupted" in repair.changes(host.name)
        assert lab.ssh(host, "dpkg --audit && gcc --version").returncode == 0
        run_pyinfra(inventory, DEPLOYS / "packages.py").assert_no_changes([host.name])
    finally:
        lab.remove_host(host)


UNREACHABLE = {"lab-gone": f"{SUBNET_PREFIX}.250"}  # inside the lab network, no host behind it


def test_unreachable_host_fails_alone_while_the_others_converge(
        lab: Lab, fresh_hosts: list[Host], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun]) -> None:
    names = [h.name for h in fresh_hosts]
    result = run_pyinfra(make_inventory(fresh_hosts, extra_hosts=UNREACHABLE), DEPLOYS / "basic.py")
    assert result.failed_hosts == ["lab-gone"], result.explain()
    assert "lab-gone" not in result.hosts
    result.assert_converged(names)
    for host in fresh_hosts:
        assert lab.ssh(host, "test -f /etc/gpufleet-lab-test.conf").returncode == 0


def test_fail_percent_stops_the_fleet_when_a_host_is_unreachable(
        lab: Lab, fresh_hosts: list[Host], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun]) -> None:
    result = run_pyinfra(make_inventory(fresh_hosts, extra_hosts=UNREACHABLE), DEPLOYS / "basic.py",
                         "--fail-percent", "0")
    assert result.returncode != 0, result.explain()
    assert not any(result.changes(h.name) for h in fresh_hosts), result.explain()
    for host in fresh_hosts:
        assert lab.ssh(host, "test -e /etc/gpufleet-lab-test.conf").returncode == 1, f"{host.name} was changed"
