"""Fixtures for lab tests: real Debian 12 hosts over SSH on this machine (see gpufleet_lab).

The hosts' GPUs, NVIDIA packages and torch are STAND-INS (no GPU exists here); apt, dpkg, sshd, pip,
lspci, modinfo and pyinfra are real. Hosts made with `lab.add_hosts(n, build_env=True)` also get the real CUDA 13.0
toolkit and a real torch venv to compile xformers (gpufleet_lab/buildenv.py; tests/lab/test_xformers_stage.py);
`lab.add_hosts(n, systemd=True)` boots systemd as their PID 1, and `lab.restart_host(host)` restarts one
(tests/lab/test_fleet_cache.py).
  lab          session-scoped running Lab (3 shared hosts), torn down at the end
  lab_hosts    the 3 shared hosts (other tests may have changed them)
  fresh_hosts  3 new hosts from the cached base, removed after the test
  make_inventory(hosts, kind="py"|"yaml", extra_hosts=None, user="root"|"labadmin") -> Path
               inventory for those hosts (labadmin: passwordless sudo, operations run with sudo)
  run_pyinfra(inventory, deploy, *extra) -> PyinfraRun  the real pyinfra CLI, results parsed
"""

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpufleet_lab import Lab, prepare, rootfs
from gpufleet_lab.hosts import Host
from gpufleet_lab.runner import PyinfraRun
from gpufleet_lab.runner import run_pyinfra as _run_pyinfra
from gpufleet_lab.system import LabError
from tests.conftest import cannot_run, timed

DEPLOYS = Path(__file__).parent / "deploys"


def _why_lab_cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, overlay mounts); run the lab tests as root"
    if subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False).returncode != 0:
        return "cannot create network namespaces here (unshare --net failed)"
    return None


@pytest.fixture(scope="session")
def lab(lab_tools: None) -> Iterator[Lab]:
    reason = _why_lab_cannot_run()
    if reason:
        cannot_run(reason)
    cold = not (rootfs.base_dir() / ".complete").exists()
    try:
        # Installs what is missing: the Debian base, OS packages, wheels and the sdist (minutes on a new machine).
        with timed("lab prepare", "cold: no cached base" if cold else "cache was warm"):
            prepare()
    except LabError as error:
        pytest.fail(f"the lab could not be prepared: {error}", pytrace=False)
    lab = Lab()
    try:
        with timed("lab up (3 hosts)"):
            lab.up(3)
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="session")
def lab_hosts(lab: Lab) -> list[Host]:
    return lab.hosts()[:3]


@pytest.fixture
def fresh_hosts(lab: Lab) -> Iterator[list[Host]]:
    created = lab.add_hosts(3)
    yield created
    for host in created:
        lab.remove_host(host)


@pytest.fixture
def make_inventory(lab: Lab, tmp_path: Path) -> Callable[..., Path]:
    def make(hosts: list[Host], kind: str = "py", extra_hosts: dict[str, str] | None = None,
             user: str = "root") -> Path:
        if kind == "yaml":
            extra = {name: {"address": address, "ssh_user": "root", "ssh_key": str(lab.control_key),
                            "ssh_known_hosts_file": str(lab.known_hosts)}
                     for name, address in (extra_hosts or {}).items()}
            return lab.write_inventory_yaml(tmp_path / "inventory.yaml", hosts, extra, user)
        return lab.write_inventory_py(tmp_path / "lab_inventory.py", hosts, extra_hosts, user)
    return make


@pytest.fixture
def run_pyinfra() -> Callable[..., PyinfraRun]:
    return _run_pyinfra
