"""One gpufleet run at a time per host (gpufleet/hostlock.py), with real pyinfra runs over SSH against lab hosts.

The hosts are real Debian 12 systems; the NVIDIA packages they install are STAND-INS (tests/lab/test_system_stack.py).
The lock's own log on each host (/var/log/gpufleet-lock.log) says which run held it when.
"""

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from gpufleet import hostlock
from gpufleet_lab import Lab
from gpufleet_lab.hosts import Host
from gpufleet_lab.runner import PyinfraRun, parse, start_pyinfra
from tests.lab.test_system_stack import STACK, converge, inventory_with, refused

pytestmark = pytest.mark.lab

LOG_LINE = re.compile(r"^(?P<at>\S+) (?P<event>taken|busy, refused|released): \S+ pid (?P<pid>\d+)")


def lock_log(lab: Lab, host: Host) -> list[tuple[datetime, str, int]]:
    """(time, event, pyinfra pid) of each take, refusal and release on the host."""
    events = []
    for line in lab.ssh(host, f"cat {hostlock.LOG}").stdout.splitlines():
        match = LOG_LINE.match(line)
        if match:
            events.append((datetime.fromisoformat(match["at"].replace("Z", "+00:00")), match["event"],
                           int(match["pid"])))
    return events


def finish(proc: subprocess.Popen[str]) -> PyinfraRun:
    stdout, stderr = proc.communicate(timeout=1800)
    return parse(proc.args, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))


def give_work(lab: Lab, hosts: list[Host]) -> None:
    """Something for the next run to do on converged hosts (a venv to create and fill) so it holds the lock a while."""
    for host in hosts:
        lab.ssh(host, "rm -rf /opt/gpufleet/venv")


@pytest.fixture
def converged(lab: Lab, fresh_hosts: list[Host], make_inventory: Callable[..., Path],
              run_pyinfra: Callable[..., PyinfraRun]) -> tuple[list[Host], Callable[..., Path]]:
    hosts = fresh_hosts[:2]
    converge(lab, hosts, inventory_with(make_inventory, hosts), run_pyinfra)
    return hosts, lambda **settings: inventory_with(make_inventory, hosts, **settings)


def test_a_second_run_one_second_later_fails_naming_the_first_which_converges(
        lab: Lab, converged, run_pyinfra: Callable[..., PyinfraRun]) -> None:
    hosts, inventory_for = converged
    names = [h.name for h in hosts]
    inventory = inventory_for()
    give_work(lab, hosts)
    first = start_pyinfra(inventory, STACK)
    time.sleep(1)
    second = run_pyinfra(inventory, STACK)
    first_run = finish(first)
    first_run.assert_converged(names)
    assert "Python venv | Create the venv /opt/gpufleet/venv" in first_run.changes(names[0])
    assert second.returncode != 0, second.explain()
    machine = socket.gethostname()
    for host in hosts:
        assert refused(second, host.name, f"another gpufleet run holds this host: root from {machine} "
                                          f"(pid {first.pid}) since"), second.explain()
        assert not second.changes(host.name)
        events = lock_log(lab, host)
        taken = [at for at, event, pid in events if event == "taken" and pid == first.pid]
        released = [at for at, event, pid in events if event == "released" and pid == first.pid]
        busy = [at for at, event, pid in events if event == "busy, refused" and pid != first.pid]
        assert len(taken) == len(released) == 1 and len(busy) == 1, events
        assert taken[0] <= busy[0] <= released[0], events
        # The second run never held the lock, so none of its operations ran: only the first run's did.
        assert not [e for e in events if e[1] == "taken" and e[2] not in (first.pid,) and e[0] >= taken[0]], events
    run_pyinfra(inventory, STACK).assert_no_changes(names)


def test_a_second_run_with_lock_timeout_waits_for_the_first_then_finds_nothing_to_do(
        lab: Lab, converged, run_pyinfra: Callable[..., PyinfraRun]) -> None:
    hosts, inventory_for = converged
    names = [h.name for h in hosts]
    inventory = inventory_for(lock_timeout=600)
    give_work(lab, hosts)
    first = start_pyinfra(inventory, STACK)
    time.sleep(1)
    second = run_pyinfra(inventory, STACK)
    finish(first).assert_converged(names)
    second.assert_no_changes(names)
    for host in hosts:
        events = lock_log(lab, host)
        released = next(at for at, event, pid in events if event == "released" and pid == first.pid)
        later = [at for at, event, pid in events if event == "taken" and pid not in (first.pid,) and at >= released]
        assert later, f"the second run did not wait for the first to release the lock: {events}"


def test_the_lock_of_a_killed_run_is_taken_over_by_the_next_run(
        lab: Lab, converged, run_pyinfra: Callable[..., PyinfraRun]) -> None:
    hosts, inventory_for = converged
    names = [h.name for h in hosts]
    inventory = inventory_for()
    give_work(lab, hosts)
    killed = start_pyinfra(inventory, STACK)
    deadline = time.monotonic() + 300
    busy: list[Host] = []
    while not busy:
        assert time.monotonic() < deadline and killed.poll() is None, "the run never reached the venv"
        busy = [h for h in hosts if "ensurepip" in " ".join(lab.processes(h).values())]
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    # No waiting: the next run starts at once and takes the lock the dead run left.
    repair = run_pyinfra(inventory, STACK)
    repair.assert_converged(names)
    run_pyinfra(inventory, STACK).assert_no_changes(names)
    for host in busy:
        # The dead run's venv creation (sshd left it running) was stopped before its lock was let go.
        log = lab.ssh(host, f"cat {hostlock.LOG}").stdout
        assert "stopped what the run left running" in log, log


def test_a_holder_whose_run_is_gone_but_whose_connection_lingers_is_ended_and_taken_over(
        lab: Lab, converged, run_pyinfra: Callable[..., PyinfraRun]) -> None:
    # A dropped link: the control machine's run is dead, sshd on the host has not noticed, so the holder still
    # holds the lock. Made here with gpufleet's own holder script, for a run (pid) on this machine that is gone.
    hosts, inventory_for = converged
    gone = subprocess.Popen(["true"])
    gone.wait()
    owner = re.sub(r" pid \d+ ", f" pid {gone.pid} ", hostlock.owner_text())
    lingering = [subprocess.Popen(lab.ssh_command(h, hostlock.holder_script(owner, 0)), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True) for h in hosts]
    try:
        for proc in lingering:
            assert proc.stdout.readline().strip() == "taken"
        run = run_pyinfra(inventory_for(), STACK)
        run.assert_no_changes([h.name for h in hosts])
        for host in hosts:
            assert "stale holder" in lab.ssh(host, f"cat {hostlock.LOG}").stdout
    finally:
        for proc in lingering:
            proc.kill()
            proc.wait()


def test_a_silent_connection_releases_the_lock_after_stopping_what_its_run_left_running(lab: Lab) -> None:
    # A dropped link as the host sees it: the connection stays open, no heartbeat comes. A leftover of the run
    # (here a sleep started on the same connection) must be stopped before the lock is released.
    host = lab.add_host()
    try:
        owner = hostlock.owner_text()
        script = f"sleep 1000 & echo leftover $!; {hostlock.holder_script(owner, 0)}"
        silent = subprocess.Popen(lab.ssh_command(host, script), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        leftover = int(silent.stdout.readline().split()[1])
        assert silent.stdout.readline().strip() == "taken"
        held = lab.ssh(host, f"flock -n {hostlock.LOCK} true")
        assert held.returncode != 0, "the lock is not held"
        time.sleep(hostlock.HOLDER_TIMEOUT_S + 15)
        assert lab.ssh(host, f"flock -n {hostlock.LOCK} true").returncode == 0, "still held after the timeout"
        assert lab.ssh(host, f"test -d /proc/{leftover}").returncode != 0, "the run's leftover still runs"
        log = lab.ssh(host, f"cat {hostlock.LOG}").stdout
        assert f"stopped what the run left running: {leftover}" in log and f"released: {owner}" in log, log
        silent.kill()
        silent.wait()
    finally:
        lab.remove_host(host)
