"""A run killed at each dangerous point is repaired by the next run, and the run after it changes nothing.

Real pyinfra runs over SSH against lab hosts (Debian 12); the NVIDIA packages, the GPU and torch are STAND-INS (see
tests/lab/test_system_stack.py). A run is killed either by SIGKILL of the pyinfra process on this machine or by
killing the host's SSH session processes (a dropped link). Each test first checks that the kill left the state it
is about, so a kill that came too late fails instead of passing by luck.
"""

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gpufleet_lab import Lab
from gpufleet_lab.hosts import Host
from gpufleet_lab.runner import PyinfraRun, parse, start_pyinfra
from tests.lab.test_fleet_runs import run_and_cut
from tests.lab.test_system_stack import STACK, converge, inventory_with, reboot, refused

pytestmark = pytest.mark.lab

STACK_TORCH = Path(__file__).parent / "deploys" / "system_stack_torch.py"
SOURCE = "etc/apt/sources.list.d/gpufleet-cuda.sources"


def run_and_kill(inventory: Path, deploy: Path, reached: Callable[[], bool], timeout: float = 300) -> PyinfraRun:
    """Start pyinfra and SIGKILL it the moment `reached()` is true (polled every 20 ms)."""
    proc = start_pyinfra(inventory, deploy)
    deadline = time.monotonic() + timeout
    while not reached():
        assert proc.poll() is None, f"pyinfra ended before the kill point\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "the kill point was never reached"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=60)
    return parse(proc.args, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))


def test_killed_between_the_nvidia_source_and_apt_update_is_repaired(
        lab: Lab, fresh_hosts: list[Host], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun]) -> None:
    host = fresh_hosts[0]
    inventory = inventory_with(make_inventory, [host])
    killed = run_and_kill(inventory, STACK, lambda: (host.root / SOURCE).exists())
    assert killed.returncode == -signal.SIGKILL
    time.sleep(2)  # anything the dead run had started on the host has finished by now
    lists = lab.ssh(host, "ls /var/lib/apt/lists/ | grep -c cuda_repos || true").stdout.strip()
    assert (host.root / SOURCE).exists() and lists == "0", "the kill came too late: apt had read the repository"
    # Before the fix the lists were never refreshed and the driver install failed ("Unable to locate package").
    converge(lab, [host], inventory, run_pyinfra)
    run_pyinfra(inventory, STACK).assert_no_changes([host.name])


def test_killed_between_the_driver_install_and_the_reboot_stops_every_run_until_rebooted(
        lab: Lab, fresh_hosts: list[Host], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun]) -> None:
    host = fresh_hosts[0]
    inventory = inventory_with(make_inventory, [host])
    on_disk = lambda: lab.ssh(host, "modinfo -F version nvidia 2>/dev/null").stdout.strip()  # noqa: E731
    run_and_kill(inventory, STACK, lambda: bool(on_disk()))
    time.sleep(5)  # the killed run's apt finishes on its own (or leaves dpkg for the next run to repair)
    version = on_disk()
    assert version and not lab.ssh(host, "cat /proc/driver/nvidia/version").stdout.strip(), "no module on disk"
    for _ in range(2):  # the stop message on every run, not only on the run that installed the driver
        stopped = run_pyinfra(inventory, STACK)
        assert stopped.returncode != 0, stopped.explain()
        assert refused(stopped, host.name, f"the NVIDIA module {version} is installed but not loaded"), \
            stopped.explain()
        assert refused(stopped, host.name, "Reboot the host"), stopped.explain()
    reboot(lab, [host])
    run_pyinfra(inventory, STACK).assert_converged([host.name])
    run_pyinfra(inventory, STACK).assert_no_changes([host.name])


def test_venv_creation_cut_before_pip_is_recreated(
        lab: Lab, fresh_hosts: list[Host], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun]) -> None:
    host = fresh_hosts[0]
    inventory = inventory_with(make_inventory, [host])
    converge(lab, [host], inventory, run_pyinfra)
    lab.ssh(host, "rm -rf /opt/gpufleet/venv")
    run_and_cut(lab, run_pyinfra, inventory, STACK, host, lambda cmd: "ensurepip" in cmd)
    state = lab.ssh(host, "/opt/gpufleet/venv/bin/python -c '' && ! /opt/gpufleet/venv/bin/python -m pip --version")
    assert state.returncode == 0, "the cut came too late (or too early): the venv is not a venv without pip"
    repair = run_pyinfra(inventory, STACK)
    repair.assert_converged([host.name])
    assert "Python venv | Create the venv /opt/gpufleet/venv again (pip is missing)" in repair.changes(host.name)
    assert lab.ssh(host, "/opt/gpufleet/venv/bin/python -m pip --version").returncode == 0
    run_pyinfra(inventory, STACK).assert_no_changes([host.name])


def test_torch_install_killed_midway_is_reinstalled(
        lab: Lab, fresh_hosts: list[Host], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun]) -> None:
    host = fresh_hosts[0]
    inventory = inventory_with(make_inventory, [host])
    converge(lab, [host], inventory, run_pyinfra)
    # At once: the lab's stand-in torch installs in well under a second, and the run ends soon after.
    run_and_cut(lab, run_pyinfra, inventory, STACK_TORCH, host,
                lambda cmd: "pip install" in cmd and "torch==" in cmd, settle=0)
    run_pyinfra(inventory, STACK_TORCH).assert_converged([host.name])
    run_pyinfra(inventory, STACK_TORCH).assert_no_changes([host.name])
    # What a pip killed while unpacking leaves: torch's dist-info (pip freeze lists it) without all of its files.
    site = lab.ssh(host, "/opt/gpufleet/venv/bin/python -c 'import torch, os; print(os.path.dirname(torch.__file__))'")
    lab.ssh(host, f"rm {site.stdout.strip()}/__init__.py")
    assert "torch==" in lab.ssh(host, "/opt/gpufleet/venv/bin/python -m pip freeze").stdout
    repair = run_pyinfra(inventory, STACK_TORCH)
    repair.assert_converged([host.name])
    assert any("again (torch" in name for name in repair.changes(host.name)), repair.changes(host.name)
    assert lab.ssh(host, "/opt/gpufleet/venv/bin/python -c 'import torch'").returncode == 0
    run_pyinfra(inventory, STACK_TORCH).assert_no_changes([host.name])


def test_a_full_work_dir_is_refused_by_preflight_naming_the_path_and_figures(
        lab: Lab, fresh_hosts: list[Host], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun]) -> None:
    host = fresh_hosts[0]
    small = lab.ssh(host, "mkdir -p /var/lib/gpufleet && mount -t tmpfs -o size=64m tmpfs /var/lib/gpufleet")
    assert small.returncode == 0, small.stderr
    before = lab.ssh(host, "dpkg-query -W -f='${Package} ${Version}\\n'; ls -R /etc/apt /opt 2>/dev/null").stdout
    inventory = inventory_with(make_inventory, [host])
    run = run_pyinfra(inventory, STACK)
    assert run.returncode != 0, run.explain()
    assert refused(run, host.name, "0.1 GB free on /var/lib/gpufleet and needs 10 GB there for /var/lib/gpufleet"), \
        run.explain()
    assert not run.changes(host.name), run.changes(host.name)
    after = lab.ssh(host, "dpkg-query -W -f='${Package} ${Version}\\n'; ls -R /etc/apt /opt 2>/dev/null").stdout
    assert after == before, "preflight refused, yet the host changed"
