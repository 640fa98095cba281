"""The build user (a real, unprivileged account on a lab host) tampers with its own tree between runs: planted
symbolic links and forged build manifests. The next run, as root, refuses the host with a clear message and
touches nothing outside work_dir, through the real pyinfra CLI over SSH.

Real: the host, the build user gpufleet creates, the files it plants, pyinfra's run and the refusal. No xformers is
compiled: a refused run stops before the build, and a forged manifest is what a finished build looks like.
"""

from collections.abc import Callable
from pathlib import Path

import pytest

from gpufleet.buildplan import ROOT_STATE_DIR, normalise_arch_list
from gpufleet.inventory import load_inventory
from gpufleet_lab import Lab
from gpufleet_lab.hosts import Host
from gpufleet_lab.runner import PyinfraRun
from gpufleet.settings import load_settings
from gpufleet.xformers_fleet import wheel_fingerprint
from tests.lab.test_xformers_stage import (  # noqa: F401 (build_hosts is a fixture)
    WORK,
    XFORMERS_STAGE,
    build_hosts,
    build_inventory,
    prepare_python,
)

pytestmark = [pytest.mark.lab]

MARKER = "/run/gpufleet-tamper-marker"
# What root could be tricked into changing: anything under these, outside work_dir, newer than the marker.
WATCHED = "/etc /usr /opt /root /var/lib /var/cache"


def as_build_user(lab: Lab, host: Host, command: str) -> None:
    result = lab.ssh(host, f"su -s /bin/sh -c {quote(command)} gpufleet")
    assert result.returncode == 0, result.stderr


def quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def fingerprint_of(inventory: Path, name: str) -> str:
    """The wheel fingerprint gpufleet computes for this host (its settings, sm_120)."""
    spec = next(h for h in load_inventory(inventory).hosts if h.name == name)
    config = {**{n: s.default for n, s in load_settings().items()}, **spec.settings}
    return wheel_fingerprint(config, normalise_arch_list(config["xformers_arch_list"]))


def touched_outside_work_dir(lab: Lab, host: Host) -> list[str]:
    found = lab.ssh(host, f"find {WATCHED} -xdev -newer {MARKER} -not -path '/var/lib/gpufleet/*' "
                          "-not -path /var/lib/gpufleet 2>/dev/null").stdout.split()
    return found


def refused_run(lab: Lab, host: Host, inventory: Path, run_pyinfra: Callable[..., PyinfraRun]) -> PyinfraRun:
    assert lab.ssh(host, f"touch {MARKER} && sleep 1").returncode == 0
    run = run_pyinfra(inventory, XFORMERS_STAGE)
    assert run.returncode != 0, run.explain()
    return run


@pytest.fixture
def tampered_host(lab: Lab, build_hosts, make_inventory, run_pyinfra, tmp_path):  # noqa: F811
    """One build host after the python stage (gpufleet made the build user and work_dir), with its inventory."""
    host = build_hosts(1)[0]
    inventory = build_inventory(lab, make_inventory, [host], tmp_path)
    prepare_python([host], inventory, run_pyinfra)
    return host, inventory


def test_planted_symlinks_are_refused_and_root_follows_none(
        lab: Lab, tampered_host, run_pyinfra: Callable[..., PyinfraRun], tmp_path: Path) -> None:
    host, inventory = tampered_host
    fp = fingerprint_of(inventory, host.name)
    cron = lab.ssh(host, "stat -c '%U %a' /etc/cron.d /etc/passwd; ls -la /etc/cron.d").stdout
    # The wheel directory of the next build points at /etc/cron.d, the build script at /etc/passwd.
    as_build_user(lab, host, f"mkdir -p {WORK}/wheels && ln -s /etc/cron.d {WORK}/wheels/{fp} "
                             f"&& ln -s /etc/passwd {WORK}/build_wheel.sh")

    run = refused_run(lab, host, inventory, run_pyinfra)
    for link in (f"{WORK}/wheels/{fp} -> /etc/cron.d", f"{WORK}/build_wheel.sh -> /etc/passwd"):
        assert f"{link} is a symbolic link in the build user's tree; gpufleet never follows such a link as root" \
            in run.stderr, run.explain()
    assert lab.ssh(host, "stat -c '%U %a' /etc/cron.d /etc/passwd; ls -la /etc/cron.d").stdout == cron
    assert touched_outside_work_dir(lab, host) == []
    # Nothing was fetched: the only file may be the control machine's lock (gpufleet.stage.lock_control_folder).
    assert not [p for p in (tmp_path / "wheel-cache").rglob("*") if p.is_file() and p.name != ".gpufleet.lock"]


@pytest.mark.parametrize("wheel", ["../escaped.whl", "x.whl' ; touch /tmp/pwned ; echo '"],
                         ids=["dotdot", "shell-metacharacters"])
def test_forged_manifest_is_refused_and_nothing_outside_work_dir_changes(
        lab: Lab, tampered_host, run_pyinfra: Callable[..., PyinfraRun], tmp_path: Path, wheel: str) -> None:
    host, inventory = tampered_host
    fp = fingerprint_of(inventory, host.name)
    manifest = ('{"fingerprint": "%s", "wheel": "%s", "wheel_sha256": "%s"}'
                % (fp, wheel.replace("'", "'\\''"), "0" * 64))
    as_build_user(lab, host, f"mkdir -p {WORK}/wheels/{fp} && echo 'escaped' > {WORK}/wheels/escaped.whl "
                             f"&& printf '%s' '{manifest}' > {WORK}/wheels/{fp}/manifest.json")

    run = refused_run(lab, host, inventory, run_pyinfra)
    assert (f"{WORK}/wheels/{fp}/manifest.json names the wheel {wheel!r}, which is no xformers wheel file name"
            in run.stderr), run.explain()
    assert touched_outside_work_dir(lab, host) == []
    assert lab.ssh(host, f"test -e /tmp/pwned || test -e {ROOT_STATE_DIR}/xformers").returncode != 0
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".whl")]
