"""Real pyinfra runs against three lab hosts: convergence, idempotence, dropped connections, unreachable hosts.

The hosts are real Debian 12 systems over SSH; the NVIDIA packages they install are STAND-INS.
"""

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gpufleet.lab import Lab
from gpufleet.lab.hosts import Host
from gpufleet.lab.rootfs import SUDO_USER
from gpufleet.lab.runner import REPO_ROOT, PyinfraRun

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


@pytest.mark.skipif(not (REPO_ROOT / "inventory.py").exists(), reason="root inventory.py (YAML loader) not merged yet")
def test_yaml_inventory_through_root_inventory_converges_and_reruns_clean(
        fresh_hosts: list[Host], make_inventory: Callable[..., Path], run_pyinfra: Callable[..., PyinfraRun]) -> None:
    names = [h.name for h in fresh_hosts]
    inventory = make_inventory(fresh_hosts, kind="yaml")
    run_pyinfra(inventory, DEPLOYS / "basic.py").assert_converged(names)
    run_pyinfra(inventory, DEPLOYS / "basic.py").assert_no_changes(names)


def test_connection_cut_mid_operation_is_repaired_by_the_next_run(
        lab: Lab, fresh_hosts: list[Host], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun]) -> None:
    names = [h.name for h in fresh_hosts]
    victim, others = fresh_hosts[0], names[1:]
    inventory = make_inventory(fresh_hosts)
    outcome: list[PyinfraRun] = []
    runner = threading.Thread(target=lambda: outcome.append(run_pyinfra(inventory, DEPLOYS / "slow.py")))
    runner.start()
    deadline = time.monotonic() + 60
    while not any("payload.done" in cmd and "sleep" in cmd for cmd in lab.processes(victim).values()):
        assert time.monotonic() < deadline and runner.is_alive(), "the slow step never started on the victim"
        time.sleep(0.1)
    killed = lab.cut_ssh_sessions(victim)
    runner.join(120)
    cut = outcome[0]
    assert killed
    assert victim.name in cut.failed_hosts or cut.errors(victim.name), cut.explain()
    cut.assert_converged(others)
    assert lab.ssh(victim, "cat /var/lib/gpufleet-lab-test/payload").stdout.strip() == "partial"

    repair = run_pyinfra(inventory, DEPLOYS / "slow.py")
    repair.assert_converged(names)
    assert repair.changes(victim.name) and not any(repair.changes(name) for name in others)
    assert lab.ssh(victim, "cat /var/lib/gpufleet-lab-test/payload").stdout.strip() == "complete"
    run_pyinfra(inventory, DEPLOYS / "slow.py").assert_no_changes(names)


UNREACHABLE = {"lab-gone": "10.213.47.250"}  # inside the lab network, no host behind it


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
