"""Built xformers wheels through the fleet cache host, in the lab: the builder uploads the wheel to the cache host's
private devpi index and every other host downloads it from there; the control machine relays no wheel byte.

Real: the xformers stage over SSH through the real pyinfra CLI, devpi-server 6.20.3 on the cache host with its
private index, curl's upload and download, the sha256 checks, pip installing the wheel, and the wheel itself (the
real sm_120 build of the `ci_wheel` fixture, seeded as the builder's finished build so nothing compiles here, as
tests/lab/test_rerun.py does). Stand-in: the GPU and its open 580 driver. A run killed between the build and
the upload is SIGKILL of the pyinfra process on this machine (as in tests/lab/test_interruptions.py).

Bytes are counted on this lab's bridge (its rx and tx counters in /sys/class/net): everything the control
machine sends to or receives from the lab hosts (SSH, and the lab's mirror it serves) crosses it, while traffic
between two hosts is forwarded by the bridge and counted on neither of its counters.
"""

import json
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from gpufleet import cache
from gpufleet_lab import Lab
from gpufleet_lab.hosts import Host
from gpufleet_lab.paths import BRIDGE_NAME
from gpufleet_lab.runner import REPO_ROOT, PyinfraRun
from tests.lab.test_interruptions import run_and_kill
from tests.lab.test_xformers_stage import (  # noqa: F401  (build_hosts: the fixture, shared)
    ROOT_WORK,
    WORK,
    XFORMERS_STAGE,
    build_hosts,
    changed,
    installed,
    prepare_python,
)

pytestmark = [pytest.mark.lab, pytest.mark.build]

CACHE_STAGE = REPO_ROOT / "deploys" / "cache.py"
BUILD_TOOLS = "g++ make patch python3.11-dev"


def bridge_bytes() -> int:
    """Bytes the control machine sent and received on this lab's network so far."""
    stats = Path("/sys/class/net") / BRIDGE_NAME / "statistics"
    return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())


def write_inventory(lab: Lab, path: Path, hosts: list[Host], cache_host: Host | None, **settings: object) -> Path:
    """The lab's YAML inventory for hosts, on the lab's https upstreams; with cache_host, that workstation serves
    the fleet cache too."""
    lab.write_inventory_yaml(path, hosts, settings={**lab.https_mirror_settings(), "reboot_policy": "never",
                                                    "min_free_disk_gb": 10, **settings})
    if cache_host is not None:
        document = yaml.safe_load(path.read_text())
        document["groups"]["cache"] = {"hosts": {cache_host.name: {}}}
        path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def seed_finished_build(lab: Lab, host: Host, ci_wheel, sdist: Path) -> None:
    """The CI wheel as the host's own finished build of its fingerprint (what build_wheel.sh leaves), the sdist
    where the stage downloads it, and the build tools installed: the xformers stage then compiles and fetches
    nothing, and the bytes counted are the wheel's way alone."""
    fp = ci_wheel.out_dir.name
    out = f"{WORK}/wheels/{fp}"
    for source, dest in ((ci_wheel.out_dir / "manifest.json", f"{out}/manifest.json"),
                         (ci_wheel.wheel, f"{out}/{ci_wheel.wheel.name}"),
                         (sdist, f"{WORK}/{sdist.name}")):
        put = subprocess.run(lab.ssh_command(host, f"mkdir -p {shlex.quote(out)} && cat > {shlex.quote(dest)}"),
                             input=source.read_bytes(), capture_output=True, check=False)
        assert put.returncode == 0, (host.name, put.stderr)
    owned = lab.ssh(host, f"chown -R gpufleet: {WORK} && apt-get -q update && "
                          f"apt-get install -y -q --no-install-recommends {BUILD_TOOLS}", timeout=600)
    assert owned.returncode == 0, (host.name, owned.stderr[-2000:])


def forget_xformers(lab: Lab, host: Host) -> None:
    """Uninstall xformers and remove root's staged wheel and stamp: the host needs the wheel again."""
    result = lab.ssh(host, f"/opt/torchvenv/bin/python -m pip uninstall -q -y xformers && rm -rf {ROOT_WORK}")
    assert result.returncode == 0, (host.name, result.stderr)


def index_files(lab: Lab, cache_host: Host) -> dict[str, str]:
    page = lab.ssh(cache_host, f"curl -fsS http://127.0.0.1:3141/{cache.WHEEL_INDEX}/+simple/xformers/").stdout
    return cache.index_files(page)


def test_the_wheel_goes_through_the_cache_host_not_the_control_machine_and_a_killed_upload_is_redone(
        lab: Lab, build_hosts: Callable[[int], list[Host]], run_pyinfra: Callable[..., PyinfraRun], ci_wheel,
        xformers_sdist: Path, tmp_path: Path) -> None:
    # A cache host runs its servers as systemd services: these hosts boot systemd.
    first, second, server = build_hosts(3, systemd=True)
    hosts = [first, second, server]
    names = [h.name for h in hosts]
    fp = ci_wheel.out_dir.name
    wheel_size = ci_wheel.wheel.stat().st_size
    build = {**lab.build_settings(), "xformers_arch_list": ["12.0"]}
    plain = write_inventory(lab, tmp_path / "plain.yaml", hosts, None, **build,
                            wheel_cache_dir=str(tmp_path / "plain-cache"))
    prepare_python(hosts, plain, run_pyinfra)
    # The builder without a cache (the first host that needs the wheel) and the cache host (the builder with one).
    for host in (first, server):
        seed_finished_build(lab, host, ci_wheel, xformers_sdist)

    # Today's path, without a cache: the wheel goes to this machine and from it to the two other hosts.
    before = bridge_bytes()
    relayed = run_pyinfra(plain, XFORMERS_STAGE)
    relayed_bytes = bridge_bytes() - before
    relayed.assert_converged(names)
    assert changed(relayed, first.name, "Fetch the built wheel to this machine's cache"), relayed.explain()
    assert not changed(relayed, first.name, "Build xformers"), relayed.explain()
    assert (tmp_path / "plain-cache" / fp / ci_wheel.wheel.name).is_file()

    for host in hosts:
        forget_xformers(lab, host)
    # The cache host's servers, set up with the lab's own (stand-in) torch, which its warm-up fetches.
    serving = write_inventory(lab, tmp_path / "cache-stage.yaml", hosts, server)
    run_pyinfra(serving, CACHE_STAGE, "--limit", server.name).assert_converged([server.name])
    assert index_files(lab, server) == {}

    through_cache = write_inventory(lab, tmp_path / "cache.yaml", hosts, server, **build,
                                    wheel_cache_dir=str(tmp_path / "cache-wheels"))
    # A run killed after the build (the cache host's is finished) and before the upload: SIGKILL the moment the
    # builder's upload begins (its first command makes root's staging directory).
    staging = server.root / ROOT_WORK.lstrip("/") / fp
    killed = run_and_kill(through_cache, XFORMERS_STAGE, staging.exists)
    assert killed.returncode == -signal.SIGKILL
    time.sleep(2)  # anything the dead run had started on a host has finished by now
    assert index_files(lab, server) == {}, "the kill came too late: the wheel was uploaded"
    assert not (tmp_path / "cache-wheels" / fp / "published.json").exists()

    # The next run decides from the index (no such wheel there) and the finished build: it uploads, builds nothing.
    before = bridge_bytes()
    run = run_pyinfra(through_cache, XFORMERS_STAGE)
    cached_bytes = bridge_bytes() - before
    run.assert_converged(names)

    # The cache host builds (it has the toolkit and torch), though it comes last in the inventory.
    assert changed(run, server.name, f"Upload the built wheel to the cache host's index {cache.WHEEL_INDEX}"), \
        run.explain()
    assert not changed(run, server.name, "Build xformers"), run.explain()
    for host in (first, second):
        assert changed(run, host.name, f"Download the xformers wheel built by {server.name}"), run.explain()
        assert not changed(run, host.name, "Upload the built wheel"), run.explain()
    published = json.loads((tmp_path / "cache-wheels" / fp / "published.json").read_text())
    name = cache.index_wheel_name(ci_wheel.wheel.name, fp)
    assert published["wheel"] == name and published["wheel_sha256"] == ci_wheel.manifest["wheel_sha256"]
    assert index_files(lab, server) == {name: ci_wheel.manifest["wheel_sha256"]}
    # This machine keeps the manifest only.
    assert [p.name for p in (tmp_path / "cache-wheels" / fp).iterdir()] == ["published.json"]
    found = {host.name: installed(lab, host) for host in hosts}
    assert {found[n]["stamp"] for n in names} == {fp}, found
    assert len({found[n]["c_so"] for n in names}) == 1 and found[names[0]]["c_so"], found
    for host in (first, second):
        staged = lab.ssh(host, f"cd {ROOT_WORK}/{fp} && sha256sum -c wheel.sha256 && stat -c '%U %a' {name}")
        assert staged.returncode == 0 and staged.stdout.split()[-2:] == ["root", "644"], (host.name, staged)

    # Without the cache three wheels crossed the control machine's link (one fetched, two pushed); with it none.
    print(f"control machine's bytes: {relayed_bytes} relaying the wheel, {cached_bytes} through the cache host; "
          f"wheel {wheel_size}")
    assert 2.5 * wheel_size < relayed_bytes - cached_bytes < 4 * wheel_size, (relayed_bytes, cached_bytes, wheel_size)
    # All the control machine exchanged in the cached run (SSH alone) was less than one wheel.
    assert cached_bytes < wheel_size, (cached_bytes, wheel_size)

    run_pyinfra(through_cache, XFORMERS_STAGE).assert_no_changes(names)
    # The upload password never left the cache host (it built), and stays root's alone there.
    assert lab.ssh(server, f"stat -c '%U %a' {cache.UPLOAD_PASSWORD}").stdout.split() == ["root", "600"]
    for host in (first, second):
        assert lab.ssh(host, f"test -e {cache.BUILDER_UPLOAD_PASSWORD}").returncode == 1, host.name


def test_a_builder_that_is_not_the_cache_host_uploads_with_a_root_only_copy_of_the_password(
        lab: Lab, build_hosts: Callable[[int], list[Host]], run_pyinfra: Callable[..., PyinfraRun], ci_wheel,
        xformers_sdist: Path, tmp_path: Path) -> None:
    """A cache host that serves the cache only (no GPU stack, so no toolkit or torch): the first host that needs the
    wheel builds and uploads it. pyinfra logs in as an admin with sudo, so the password's copy goes through
    pyinfra's upload as that user first."""
    server = lab.add_host(gpu="none", systemd=True)
    try:
        first, second = build_hosts(2)
        names = [first.name, second.name]
        fp = ci_wheel.out_dir.name
        build = {**lab.build_settings(), "xformers_arch_list": ["12.0"]}

        def inventory(path: Path, **settings: object) -> Path:
            lab.write_inventory_yaml(path, [first, second, server], user="labadmin",
                                     settings={"reboot_policy": "never", "min_free_disk_gb": 10, **settings})
            document = yaml.safe_load(path.read_text())
            workstations = document["groups"]["workstations"]["hosts"]
            document["groups"]["cache"] = {"hosts": {server.name: workstations.pop(server.name)}}
            path.write_text(yaml.safe_dump(document, sort_keys=False))
            return path

        run_pyinfra(inventory(tmp_path / "cache-stage.yaml"), CACHE_STAGE, "--limit", server.name) \
            .assert_converged([server.name])
        path = inventory(tmp_path / "inventory.yaml", **build, wheel_cache_dir=str(tmp_path / "wheels"))
        prepare_python([first, second], path, run_pyinfra)
        seed_finished_build(lab, first, ci_wheel, xformers_sdist)

        run = run_pyinfra(path, XFORMERS_STAGE)
        run.assert_converged(names)
        assert changed(run, first.name, f"Copy the cache index's upload password from {server.name}"), run.explain()
        assert changed(run, first.name, "Upload the built wheel to the cache host's index"), run.explain()
        assert changed(run, second.name, f"Download the xformers wheel built by {first.name}"), run.explain()
        name = cache.index_wheel_name(ci_wheel.wheel.name, fp)
        assert index_files(lab, server) == {name: ci_wheel.manifest["wheel_sha256"]}
        assert {installed(lab, h)["stamp"] for h in (first, second)} == {fp}
        # The copy is gone after the upload, and nothing of it was left where the SSH user uploaded it first.
        assert lab.ssh(first, f"test -e {cache.BUILDER_UPLOAD_PASSWORD}").returncode == 1
        password = lab.ssh(server, f"cat {cache.UPLOAD_PASSWORD}").stdout.strip()
        leftovers = lab.ssh(first, f"grep -rlsF {shlex.quote(password)} /tmp /var/tmp /home /var/lib/gpufleet")
        assert password and leftovers.stdout == "", leftovers.stdout
        assert lab.ssh(first, f"stat -c '%U %a' {cache.BUILDER_UPLOAD_PASSWORD.rsplit('/', 1)[0]}").stdout.split() \
            == ["root", "700"]

        run_pyinfra(path, XFORMERS_STAGE).assert_no_changes([*names, server.name])
    finally:
        lab.remove_host(server)
