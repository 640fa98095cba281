"""The fleet cache in the lab: one cache host (apt-cacher-ng, devpi-server) and 3 workstations.

The lab hosts have no systemd, so the servers run from apt-cacher-ng's init script and as a detached process;
the systemd units deploys/cache.py ships are not exercised here.
"""

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from packaging.utils import canonicalize_name

from gpufleet_lab import Lab, mirrors
from gpufleet_lab.hosts import Host
from gpufleet_lab.paths import BRIDGE_IP

pytestmark = pytest.mark.lab

DEPLOY = Path(__file__).parent / "deploys" / "cache_clients.py"
PACKAGE_FILE = (".deb", ".whl", ".tar.gz")


def cache_inventory(lab: Lab, path: Path, cache_host: Host, clients: list[Host]) -> Path:
    """The lab's YAML inventory with `cache_host` moved to the group cache."""
    lab.write_inventory_yaml(path, [cache_host, *clients])
    document = yaml.safe_load(path.read_text())
    workstations = document["groups"]["workstations"]["hosts"]
    document["groups"]["cache"] = {"hosts": {cache_host.name: workstations.pop(cache_host.name)}}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def mirror_requests(lab: Lab, since: int) -> list[tuple[str, str, int]]:
    return mirrors.access_log((lab.state_dir / "mirror.log").read_text()[since:])


def log_offset(lab: Lab) -> int:
    return len((lab.state_dir / "mirror.log").read_text())


@pytest.fixture
def cache_lab(lab: Lab, fresh_hosts: list[Host], tmp_path: Path):
    cache_host = lab.add_host(gpu="none")
    try:
        yield cache_host, fresh_hosts, cache_inventory(lab, tmp_path / "inventory.yaml", cache_host, fresh_hosts)
    finally:
        lab.remove_host(cache_host)


def test_three_clients_fetch_package_files_upstream_once_and_recover_from_a_stopped_cache(
        lab: Lab, cache_lab, run_pyinfra, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_host, clients, inventory = cache_lab
    names = [cache_host.name, *(c.name for c in clients)]
    start = log_offset(lab)
    # The cache host first (installs its servers, fetches the pinned wheels once), then everyone.
    run_pyinfra(inventory, DEPLOY, "--limit", cache_host.name).assert_converged([cache_host.name])
    run_pyinfra(inventory, DEPLOY).assert_converged(names)

    requests = mirror_requests(lab, start)
    files = [(ip, path) for ip, path, status in requests if status == 200 and path.endswith(PACKAGE_FILE)]
    per_file = Counter(path for _, path in files)
    debs = {p: n for p, n in per_file.items() if p.endswith(".deb")}
    # What the clients install; devpi-server's own dependencies come once more for its installation.
    client_wheels = {p: n for p, n in per_file.items() if re.search(r"/(ninja|wheel|torch)-[^/]+\.whl$|xformers-[\d.]+\.tar\.gz$", p)}
    assert any("/patch_" in p for p in debs) and len(client_wheels) == 4, per_file
    # The CUDA repository through the cache's remap of cuda_repo_url, the keyring .deb through it too.
    assert any(re.search(r"/cuda/repos/debian12/x86_64/.*cuda-toolkit-12-8_", p) for p in debs), per_file
    assert {p: n for p, n in client_wheels.items() if n != 1} == {}, per_file
    # The cache host fetched the deploys' packages ahead: however the 3 clients' requests interleave, every .deb a
    # client installed crossed the uplink once (the cache host's own apt-cacher-ng came before its proxy did).
    installed = set()
    for client in clients:
        listing = lab.ssh(client, "dpkg-query -W -f '${Package}\\n'")
        assert listing.returncode == 0, f"{client.name}: {listing.stderr}"
        installed |= set(listing.stdout.split())
    client_debs = {p: n for p, n in debs.items() if p.rsplit("/", 1)[-1].split("_")[0] in installed}
    assert any("cuda-toolkit-12-8_" in p for p in client_debs), per_file
    assert {p: n for p, n in client_debs.items() if n != 1} == {}, per_file
    assert {ip for ip, _ in files} == {cache_host.ip}, "a client went to the upstream mirror itself"
    for client in clients:
        check = lab.ssh(client, "dpkg -s patch >/dev/null && /opt/gpufleet-cache-test/venv/bin/python -c "
                                "'import torch, ninja; print(torch.__version__)'")
        assert check.returncode == 0, f"{client.name}: {check.stderr}"
        assert "+cu128" in check.stdout

    assert_cache_stats_match_the_clients(lab, inventory, cache_host, clients)

    run_pyinfra(inventory, DEPLOY).assert_no_changes(names)

    assert lab.ssh(cache_host, "/etc/init.d/apt-cacher-ng stop").returncode == 0
    monkeypatch.setenv("CACHE_TEST_PACKAGES", "patch ccache")
    # Only a client: the cache host's own run would start apt-cacher-ng again.
    down = run_pyinfra(inventory, DEPLOY, "--limit", clients[0].name)
    assert down.returncode != 0, down.explain()
    assert f"Could not connect to {cache_host.ip}:3142" in down.stderr, down.explain()

    again = run_pyinfra(inventory, DEPLOY)
    again.assert_converged(names)
    for client in clients:
        assert lab.ssh(client, "dpkg -s ccache >/dev/null").returncode == 0, client.name


def _sizes(lab: Lab, host: Host, command: str) -> list[int]:
    """The sizes `command` prints on `host` (find -printf '%s\\n')."""
    result = lab.ssh(host, command)
    assert result.returncode == 0, f"{host.name}: {result.stderr}"
    return [int(line) for line in result.stdout.split()]


def assert_cache_stats_match_the_clients(lab: Lab, inventory: Path, cache_host: Host, clients: list[Host]) -> None:
    """`gpufleet cache-stats` against what each client really holds, and what is really in the cache."""
    stats = subprocess.run([sys.executable, "-m", "gpufleet.cli", "cache-stats", str(inventory)],
                           capture_output=True, text=True, check=False)
    assert stats.returncode == 0, stats.stderr
    print(stats.stdout)
    lines = stats.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, stats.stdout
    blank = lines.index("")
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in lines[1:blank]}
    sent = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in lines[blank + 2:]}
    # Each client's patch .deb, its 3 wheels and the sdist were served from the cache: 3 x 1 and 3 x 4 hits at least.
    assert rows["apt-cacher-ng"][0] >= 3 and rows["apt-cacher-ng"][1] >= 1, stats.stdout
    assert rows["devpi-server"][0] >= 12 and rows["devpi-server"][4] > 0, stats.stdout
    assert set(sent) >= {c.ip for c in clients}, stats.stdout
    packages = {p.name: p.stat().st_size for p in (lab.www / "packages").iterdir()}
    venv = "/opt/gpufleet-cache-test"
    for client in clients:
        apt_mb, pip_mb, _ = sent[client.ip]
        # devpi: exactly the files of the distributions pip installed in the test venv, and the sdist on disk.
        listing = lab.ssh(client, f"{venv}/venv/bin/python -m pip list --format=json")
        assert listing.returncode == 0, f"{client.name}: {listing.stderr}"
        installed = {(canonicalize_name(d["name"]), d["version"]) for d in json.loads(listing.stdout)}
        wheels = sum(size for name, size in packages.items() if name.endswith(".whl") and
                     (canonicalize_name(name.split("-")[0]), name.split("-")[1]) in installed)
        sdist = _sizes(lab, client, f"find {venv}/xformers.tar.gz -printf '%s\\n'")
        assert pip_mb == pytest.approx((wheels + sum(sdist)) / 1e6, abs=0.051), (client.name, stats.stdout)
        # apt-cacher-ng: at least the .debs apt kept and the keyring package the deploy downloaded; at most that
        # plus the apt lists on the client and 2 kB of headers a request.
        debs = _sizes(lab, client, f"find /var/cache/apt/archives -name '*.deb' -printf '%s\\n'; "
                                   f"find {venv}/cuda-keyring.deb -printf '%s\\n'")
        lists = _sizes(lab, client, "find /var/lib/apt/lists -maxdepth 1 -type f ! -name lock -printf '%s\\n'")
        assert len(debs) >= 3, (client.name, debs)
        low, high = sum(debs), sum(debs) + sum(lists) + 2000 * (len(debs) + len(lists))
        assert low / 1e6 - 0.051 <= apt_mb <= high / 1e6 + 0.051, (client.name, low, high, stats.stdout)
    # Disk: each cache holds at least the package files the clients took from it, and not much more than it fetched.
    cached_debs = _sizes(lab, clients[0], "find /var/cache/apt/archives -name '*.deb' -printf '%s\\n'")
    assert sum(cached_debs) / 1e6 <= rows["apt-cacher-ng"][5] <= rows["apt-cacher-ng"][3] + 20, stats.stdout
    in_devpi = _sizes(lab, cache_host, "find /var/cache/gpufleet/pypi/+files -type f -printf '%s\\n'")
    assert sum(in_devpi) / 1e6 <= rows["devpi-server"][5] <= sum(in_devpi) / 1e6 + 20, stats.stdout


def test_removing_the_cache_host_removes_the_apt_drop_in(lab: Lab, cache_lab, run_pyinfra, tmp_path: Path) -> None:
    cache_host, clients, inventory = cache_lab
    run_pyinfra(inventory, DEPLOY).assert_converged([cache_host.name, *(c.name for c in clients)])
    assert lab.ssh(clients[0], "grep -q 3142 /etc/apt/apt.conf.d/01gpufleet-cache-proxy").returncode == 0

    plain = lab.write_inventory_yaml(tmp_path / "plain.yaml", clients)
    run_pyinfra(plain, DEPLOY).assert_converged([c.name for c in clients])
    for client in clients:
        assert lab.ssh(client, "test -e /etc/apt/apt.conf.d/01gpufleet-cache-proxy").returncode == 1, client.name
        conf = lab.ssh(client, "cat /opt/gpufleet-cache-test/venv/pip.conf").stdout
        assert f"{BRIDGE_IP}:8047" in conf and ":3141" not in conf


def test_a_workstation_that_serves_the_cache_installs_through_it_too(
        lab: Lab, fresh_hosts: list[Host], run_pyinfra, tmp_path: Path) -> None:
    server_host, *clients = fresh_hosts
    path = lab.write_inventory_yaml(tmp_path / "inventory.yaml", fresh_hosts)
    document = yaml.safe_load(path.read_text())
    document["groups"]["cache"] = {"hosts": {server_host.name: {}}}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    names = [h.name for h in fresh_hosts]

    run_pyinfra(path, DEPLOY).assert_converged(names)
    for host in fresh_hosts:
        conf = lab.ssh(host, "cat /opt/gpufleet-cache-test/venv/pip.conf").stdout
        assert f"index-url = http://{server_host.ip}:3141/root/pypi/+simple/" in conf, (host.name, conf)
        assert lab.ssh(host, "dpkg -s patch cuda-toolkit-12-8 >/dev/null").returncode == 0, host.name
    run_pyinfra(path, DEPLOY).assert_no_changes(names)
