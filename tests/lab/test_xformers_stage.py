"""The xformers stage on lab hosts, through the real pyinfra CLI: one REAL build per fleet, installed everywhere.

Real: the build (this machine's nvcc 13.0 bind-mounted into the hosts, the real torch 2.14.1+cu130 in a venv made
with the hosts' own Python, the real xformers 0.0.35 sdist from the lab mirror, the real patch series), apt
installing the build tools, the wheel's way from the builder to this machine's cache and on to the other hosts, and
the cubin proof read from the built _C.so. Stand-in: the GPU and its open 580 driver (Lab.set_loaded_driver), so
nothing here runs a kernel (tests/gpu does). Each build takes minutes on this 2-core machine; the module runs two
and a half: the fleet's, and the killed one with its retry (the bad patch stops before compiling).
"""

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from gpufleet_lab import Lab
from gpufleet_lab.hosts import Host, kill_pids
from gpufleet_lab.runner import REPO_ROOT, PyinfraRun

pytestmark = [pytest.mark.lab, pytest.mark.build]

PYTHON_STAGE = REPO_ROOT / "deploys" / "python.py"
XFORMERS_STAGE = REPO_ROOT / "deploys" / "xformers.py"
WORK = "/var/lib/gpufleet/xformers"
# Root's staging directory and stamp (gpufleet.buildplan.ROOT_STATE_DIR), out of the build user's reach.
ROOT_WORK = "/var/lib/gpufleet-root/xformers"
LOADED_DRIVER = "580.95.05"
COMPILERS = {"nvcc", "cicc", "ptxas"}


@pytest.fixture
def build_hosts(lab: Lab) -> Iterator[Callable[[int], list[Host]]]:
    """make(n, systemd=False): n fresh hosts with the real toolkit and torch venv, an open 580 module loaded
    (systemd: booting systemd as PID 1, as a cache host must); removed after."""
    created: list[Host] = []

    def make(count: int, systemd: bool = False) -> list[Host]:
        hosts = lab.add_hosts(count, build_env=True, systemd=systemd)
        created.extend(hosts)
        for host in hosts:
            lab.set_loaded_driver(host, LOADED_DRIVER)
        return hosts

    yield make
    for host in created:
        lab.remove_host(host)


def build_inventory(lab: Lab, make_inventory: Callable[..., Path], hosts: list[Host], tmp_path: Path,
                    **settings: object) -> Path:
    """YAML inventory: lab mirrors, the build environment's settings, sm_120, a wheel cache of this test's own."""
    path = make_inventory(hosts, kind="yaml")
    document = yaml.safe_load(path.read_text())
    document["settings"].update({
        **lab.build_settings(), "xformers_arch_list": ["12.0"], "reboot_policy": "never", "min_free_disk_gb": 10,
        "wheel_cache_dir": str(tmp_path / "wheel-cache"), **settings})
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def prepare_python(hosts: list[Host], inventory: Path, run_pyinfra: Callable[..., PyinfraRun]) -> None:
    """The stage before xformers: the build user and work dir, the adopted venv pointed at the lab's index."""
    run_pyinfra(inventory, PYTHON_STAGE).assert_converged([h.name for h in hosts])


def changed(run: PyinfraRun, name: str, operation: str) -> bool:
    """Whether an operation whose name (after pyinfra's "deploy | " prefix) starts with `operation` changed host."""
    return any(op.split(" | ")[-1].startswith(operation) for op in run.changes(name))


def built_on(run: PyinfraRun, name: str) -> bool:
    return changed(run, name, "Build xformers")


def installed(lab: Lab, host: Host) -> dict[str, str]:
    """What the host has: stamp, manifests, build logs, and the sha256 of the installed _C.so ("" when none)."""
    probe = (f"cat {ROOT_WORK}/installed 2>/dev/null; echo '|'; ls {WORK}/wheels/*/manifest.json 2>/dev/null; echo '|'; "
             f"ls {WORK}/wheels/*/build.log 2>/dev/null; echo '|'; "
             "/opt/torchvenv/bin/python -W ignore -c 'import hashlib, os, xformers; "
             "print(hashlib.sha256(open(os.path.dirname(xformers.__file__) + \"/_C.so\", \"rb\").read()).hexdigest())' "
             "2>/dev/null")
    stamp, manifests, logs, c_so = (part.strip() for part in lab.ssh(host, probe).stdout.split("|"))
    return {"stamp": stamp, "manifests": manifests, "logs": logs, "c_so": c_so}


def test_three_hosts_with_one_fingerprint_build_once_and_install_the_same_wheel(
        lab: Lab, build_hosts: Callable[[int], list[Host]], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun], tmp_path: Path) -> None:
    hosts = build_hosts(3)
    names = [h.name for h in hosts]
    inventory = build_inventory(lab, make_inventory, hosts, tmp_path)
    prepare_python(hosts, inventory, run_pyinfra)

    first = run_pyinfra(inventory, XFORMERS_STAGE)
    first.assert_converged(names)
    builders = [name for name in names if built_on(first, name)]
    assert builders == [names[0]], f"builds ran on {builders}\n{first.explain()}"
    for name in names[1:]:
        assert changed(first, name, f"Upload the xformers wheel built by {names[0]}"), first.explain()

    manifests = list((tmp_path / "wheel-cache").glob("*/manifest.json"))
    assert len(manifests) == 1, manifests
    manifest = json.loads(manifests[0].read_text())
    fp = manifests[0].parent.name
    assert manifest["fingerprint"] == fp and manifest["cubin_archs"] == ["sm_120"], manifest
    assert manifest["inputs"]["torch"] == lab.build_settings()["torch_version"], manifest
    assert "cuda_13.0" in manifest["inputs"]["nvcc"] and manifest["inputs"]["torch_cuda"] == "13.0", manifest

    found = {host.name: installed(lab, host) for host in hosts}
    assert [name for name in names if found[name]["logs"]] == [names[0]], found
    for name in names:
        assert found[name]["stamp"] == fp, found
    # Only the builder's own tree holds a build; every host installed from root's staging directory.
    assert found[names[0]]["manifests"] == f"{WORK}/wheels/{fp}/manifest.json", found
    assert len({found[name]["c_so"] for name in names}) == 1 and found[names[0]]["c_so"], found
    for host in hosts:
        owner = lab.ssh(host, f"stat -c '%U %a' {ROOT_WORK}/{fp} {ROOT_WORK}/{fp}/{manifest['wheel']}").stdout
        assert owner.split() == ["root", "755", "root", "644"], (host.name, owner)
        wheel = lab.ssh(host, f"cd {ROOT_WORK}/{fp} && sha256sum {manifest['wheel']}").stdout.split()
        assert wheel and wheel[0] == manifest["wheel_sha256"], (host.name, wheel)
        proof = json.loads(lab.ssh(host, f"cat {WORK}/wheels/{fp}/installed-cubins.json").stdout)
        assert proof["cubins"] == ["sm_120"] and proof["missing"] == [], (host.name, proof)

    run_pyinfra(inventory, XFORMERS_STAGE).assert_no_changes(names)


def test_build_killed_halfway_installs_nothing_and_the_next_run_builds_and_installs(
        lab: Lab, build_hosts: Callable[[int], list[Host]], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun], tmp_path: Path) -> None:
    hosts = build_hosts(1)
    host, name = hosts[0], hosts[0].name
    inventory = build_inventory(lab, make_inventory, hosts, tmp_path)
    prepare_python(hosts, inventory, run_pyinfra)

    result: list[PyinfraRun] = []
    runner = threading.Thread(target=lambda: result.append(run_pyinfra(inventory, XFORMERS_STAGE)))
    runner.start()
    killed = kill_compilers_mid_build(lab, host, runner)
    runner.join()
    stopped = result[0]
    assert killed, f"no nvcc/cicc/ptxas ever ran on {name}\n{stopped.explain()}"
    assert stopped.returncode != 0, stopped.explain()
    assert "build failed" in stopped.stderr, stopped.explain()
    left = installed(lab, host)
    assert left["stamp"] == "" and left["manifests"] == "" and left["c_so"] == "", left
    assert not list((tmp_path / "wheel-cache").glob("*/manifest.json"))

    retried = run_pyinfra(inventory, XFORMERS_STAGE)
    retried.assert_converged([name])
    assert built_on(retried, name), retried.explain()
    done = installed(lab, host)
    assert done["stamp"] and done["manifests"] and done["c_so"], done
    run_pyinfra(inventory, XFORMERS_STAGE).assert_no_changes([name])


def kill_compilers_mid_build(lab: Lab, host: Host, runner: threading.Thread, timeout: float = 900) -> list[int]:
    """Once CUDA compilers have run on host for a few seconds, kill every one (by PID); return the PIDs killed."""
    deadline = time.monotonic() + timeout
    first_seen = None
    while runner.is_alive() and time.monotonic() < deadline:
        compilers = [pid for pid, cmd in lab.processes(host).items() if Path(cmd.split(" ", 1)[0]).name in COMPILERS]
        if compilers and first_seen is None:
            first_seen = time.monotonic()
        if compilers and time.monotonic() - first_seen >= 5:
            kill_pids(compilers)
            return compilers
        time.sleep(0.2)
    return []


def test_patch_that_does_not_apply_stops_the_host_naming_the_patch_and_installs_nothing(
        lab: Lab, build_hosts: Callable[[int], list[Host]], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun], tmp_path: Path) -> None:
    hosts = build_hosts(1)
    host, name = hosts[0], hosts[0].name
    patches = tmp_path / "patches"
    patches.mkdir()
    bad = "0001-context-that-is-not-there.patch"
    (patches / bad).write_text(
        "--- a/setup.py\n+++ b/setup.py\n@@ -1,3 +1,3 @@\n-no such line in xformers' setup.py\n"
        "+a replacement\n unchanged context that is not there either\n another missing line\n")
    (patches / "series").write_text(f"{bad}\n")
    inventory = build_inventory(lab, make_inventory, hosts, tmp_path, xformers_patch_dir=str(patches))
    prepare_python(hosts, inventory, run_pyinfra)

    run = run_pyinfra(inventory, XFORMERS_STAGE)
    assert run.returncode != 0, run.explain()
    assert re.search(rf"\[{name}\].*patch {re.escape(bad)} does not apply", run.stderr), run.explain()
    left = installed(lab, host)
    assert left["stamp"] == "" and left["manifests"] == "" and left["c_so"] == "", left
    assert "does not apply" in lab.ssh(host, f"cat {WORK}/wheels/*/build.log").stdout
