"""The driver, CUDA and Python stages on real Debian 12 hosts over SSH, through the real pyinfra CLI.

The NVIDIA packages (nvidia-open-580 and its module, nvidia-smi, cuda-toolkit-12-8, the keyring) and the GPU are
STAND-INS from the lab's signed local repository (NVIDIA's servers cannot be reached here); apt, dpkg, modinfo,
lspci, sshd, pip and venv are real. A lab host cannot reboot, so these tests use reboot_policy: never and simulate the
reboot by loading the installed module version (Lab.set_loaded_driver); reboot_policy: auto is covered by the plan
tests.
"""

import shlex
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from gpufleet_lab import Lab
from gpufleet_lab.hosts import Host
from gpufleet_lab.paths import BRIDGE_IP
from gpufleet_lab.runner import PyinfraRun

pytestmark = pytest.mark.lab

STACK = Path(__file__).parent / "deploys" / "system_stack.py"
STACK_TORCH = Path(__file__).parent / "deploys" / "system_stack_torch.py"


def inventory_with(make_inventory: Callable[..., Path], hosts: list[Host], **settings: object) -> Path:
    """The lab's YAML inventory (mirror settings included) with extra fleet-wide settings."""
    path = make_inventory(hosts, kind="yaml")
    document = yaml.safe_load(path.read_text())
    document["settings"].update({"reboot_policy": "never", "min_free_disk_gb": 10, **settings})
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def reboot(lab: Lab, hosts: list[Host]) -> None:
    """What a reboot does to a host after a driver install: the module on disk becomes the loaded one."""
    for host in hosts:
        lab.set_loaded_driver(host, lab.ssh(host, "modinfo -F version nvidia").stdout.strip())


def converge(lab: Lab, hosts: list[Host], inventory: Path, run_pyinfra: Callable[..., PyinfraRun]) -> PyinfraRun:
    """First run installs the driver and stops for the reboot; after it, the second run converges."""
    names = [h.name for h in hosts]
    first = run_pyinfra(inventory, STACK)
    assert first.returncode != 0, first.explain()
    for name in names:
        assert refused(first, name, "the NVIDIA driver was installed or changed"), first.explain()
        assert refused(first, name, "(reboot_policy is never). Reboot the host"), first.explain()
    reboot(lab, hosts)
    second = run_pyinfra(inventory, STACK)
    second.assert_converged(names)
    return second


def refused(run: PyinfraRun, name: str, text: str) -> bool:
    """Whether the run stopped host `name` with a gpufleet refusal containing text (pyinfra prints no JSON results
    when every host failed, so this reads its log)."""
    return any(line.strip().startswith(f"[{name}] gpufleet refuses this host:") and text in line
               for line in run.stderr.splitlines())


def test_driver_cuda_python_converge_then_rerun_with_zero_changes(
        lab: Lab, fresh_hosts: list[Host], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun]) -> None:
    names = [h.name for h in fresh_hosts]
    inventory = inventory_with(make_inventory, fresh_hosts)
    converge(lab, fresh_hosts, inventory, run_pyinfra)
    for host in fresh_hosts:
        held = lab.ssh(host, "apt-mark showhold").stdout.split()
        assert "nvidia-open-580" in held and any(p.startswith("nvidia-dkms-580") for p in held), held
        assert lab.ssh(host, "modinfo -F version nvidia").stdout.strip().startswith("580.")
        source = lab.ssh(host, "cat /etc/apt/sources.list.d/gpufleet-cuda.sources").stdout
        assert "Signed-By: /usr/share/keyrings/cuda-archive-keyring.gpg" in source, source
        blacklist = lab.ssh(host, "cat /etc/apt/apt.conf.d/51gpufleet-driver-hold").stdout
        assert '"nvidia-";' in blacklist and '"cuda-";' in blacklist
        profile = lab.ssh(host, "bash -lc 'nvcc --version; echo $LD_LIBRARY_PATH'").stdout
        assert "release 12.8" in profile and "/usr/local/cuda-12.8/lib64" in profile
        venv = lab.ssh(host, "stat -c %U /opt/gpufleet/venv; /opt/gpufleet/venv/bin/python -m pip list").stdout
        assert venv.startswith("gpufleet\n") and "ninja" in venv, venv
    run_pyinfra(inventory, STACK).assert_no_changes(names)


def test_driver_update_behind_gpufleets_back_is_a_mismatch_that_stops_the_host_until_rebooted(
        lab: Lab, fresh_hosts: list[Host], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun]) -> None:
    hosts = fresh_hosts[:1]
    name = hosts[0].name
    inventory = inventory_with(make_inventory, hosts)
    converge(lab, hosts, inventory, run_pyinfra)
    installed = lab.ssh(hosts[0], "modinfo -F version nvidia").stdout.strip()
    # Newer than whatever the shared lab repository held when this host converged (other tests publish too).
    major, minor, patch = installed.split(".")
    update = f"{major}.{int(minor) + 7}.{patch}"
    lab.publish_driver(f"{update}-1")
    by_hand = lab.ssh(hosts[0], "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                                "--allow-change-held-packages nvidia-open-580 nvidia-dkms-580-open nvidia-utils-580")
    assert by_hand.returncode == 0, by_hand.stderr
    assert lab.ssh(hosts[0], "modinfo -F version nvidia").stdout.strip() == update
    stopped = run_pyinfra(inventory, STACK)
    assert stopped.returncode != 0, stopped.explain()
    assert refused(stopped, name, f"the loaded NVIDIA module is {installed} but {update} is installed"), stopped.explain()
    assert refused(stopped, name, "Reboot the host"), stopped.explain()
    reboot(lab, hosts)
    run_pyinfra(inventory, STACK).assert_no_changes([name])


def test_apt_lock_held_by_another_process_is_waited_for(
        lab: Lab, fresh_hosts: list[Host], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun]) -> None:
    hosts = fresh_hosts[:1]
    inventory = inventory_with(make_inventory, hosts, apt_lock_timeout=120)
    converge(lab, hosts, inventory, run_pyinfra)
    lab.ssh(hosts[0], "apt-get remove -y -qq python3-venv python3.11-venv >/dev/null; rm -rf /opt/gpufleet/venv")
    holder = hold_dpkg_lock(lab, hosts[0], seconds=15)
    started = time.monotonic()
    run = run_pyinfra(inventory, STACK)
    holder.join()
    run.assert_converged([hosts[0].name])
    assert time.monotonic() - started >= 10, "the install ran while the lock was held"
    assert lab.ssh(hosts[0], "/opt/gpufleet/venv/bin/python -c 'print(1)'").stdout.strip() == "1"


def test_apt_lock_held_past_the_timeout_fails_with_apts_message(
        lab: Lab, fresh_hosts: list[Host], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun]) -> None:
    hosts = fresh_hosts[:1]
    inventory = inventory_with(make_inventory, hosts, apt_lock_timeout=3)
    converge(lab, hosts, inventory, run_pyinfra)
    lab.ssh(hosts[0], "apt-get remove -y -qq python3-venv python3.11-venv >/dev/null; rm -rf /opt/gpufleet/venv")
    holder = hold_dpkg_lock(lab, hosts[0], seconds=40)
    run = run_pyinfra(inventory, STACK)
    holder.join()
    assert run.returncode != 0, run.explain()
    assert "Could not get lock /var/lib/dpkg/lock-frontend" in run.stderr, run.explain()


def test_unreachable_mirror_is_an_error_naming_the_url(
        lab: Lab, fresh_hosts: list[Host], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun]) -> None:
    hosts = fresh_hosts[:1]
    # A closed port on the lab bridge: the host reaches the address, nothing answers.
    dead = f"http://{BRIDGE_IP}:9/cuda/repos"
    inventory = inventory_with(make_inventory, hosts, cuda_repo_url=dead)
    run = run_pyinfra(inventory, STACK)
    assert run.returncode != 0, run.explain()
    assert f"{dead}/debian12/x86_64/cuda-keyring_1.1-1_all.deb" in run.stderr, run.explain()
    assert lab.ssh(hosts[0], "dpkg-query -W nvidia-open-580").returncode != 0, "nothing installed after the failure"


# A torch built for the pinned version and CUDA but without sm_120 (the lab's index serves only one with it).
SM90_TORCH = {
    "torch/__init__.py": "from torch import cuda, version\n__version__ = '2.12.0.dev20260407+cu128'\n",
    "torch/version.py": "cuda = '12.8'\n",
    "torch/cuda/__init__.py": "def get_arch_list():\n    return ['sm_80', 'sm_90']\n",
}


def test_a_torch_without_the_gpus_architecture_fails_the_check_right_after_its_install(
        lab: Lab, fresh_hosts: list[Host], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun]) -> None:
    hosts = fresh_hosts[:1]
    inventory = inventory_with(make_inventory, hosts)
    converge(lab, hosts, inventory, run_pyinfra)
    host = hosts[0]
    # Once pip has installed torch, a .pth line puts SM90_TORCH first on the venv's path: the run finds no torch
    # before its install, and this one right after it.
    python = "/opt/gpufleet/venv/bin/python"
    site = lab.ssh(host, f"{python} -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])'").stdout.strip()
    for path, text in SM90_TORCH.items():
        lab.ssh(host, f"mkdir -p /opt/sm90/{Path(path).parent} && printf %s {shlex.quote(text)} > /opt/sm90/{path}")
    pth = f"import os, sys; os.path.exists('{site}/torch/version.py') and sys.path.insert(0, '/opt/sm90')\n"
    lab.ssh(host, f"printf %s {shlex.quote(pth)} > {site}/zz-sm90-torch.pth")
    assert lab.ssh(host, f"{python} -c 'import torch'").returncode != 0, "a torch was importable before the install"
    run = run_pyinfra(inventory, STACK_TORCH)
    assert run.returncode != 0, run.explain()
    assert "torch==2.12.0.dev20260407+cu128" in lab.ssh(host, f"{python} -m pip freeze").stdout, "torch not installed"
    failed = [line for line in run.stderr.splitlines() if f"[{host.name}] torch check failed:" in line]
    assert failed and "has no sm_120 code (it has sm_80, sm_90)" in failed[0], run.explain()
    assert lab.ssh(host, "ls /var/lib/gpufleet-state/torch-* 2>/dev/null").stdout == "", "a failed torch was recorded"


def hold_dpkg_lock(lab: Lab, host: Host, seconds: int) -> threading.Thread:
    """Hold dpkg's frontend lock on host as another apt would (fcntl lock), for `seconds`."""
    script = (
        "import fcntl, time; f = open('/var/lib/dpkg/lock-frontend', 'w'); "
        f"fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep({seconds})"
    )
    thread = threading.Thread(target=lambda: lab.ssh(host, f'python3 -c "{script}"', timeout=seconds + 30))
    thread.start()
    deadline = time.monotonic() + 20
    while "lock-frontend" not in " ".join(lab.processes(host).values()):
        assert time.monotonic() < deadline, "the lock holder never started"
        time.sleep(0.1)
    time.sleep(1)
    return thread
