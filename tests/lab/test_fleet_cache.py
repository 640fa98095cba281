"""The fleet cache in the lab: one cache host (apt-cacher-ng, devpi-server) and 3 workstations.

Every host here boots systemd as its PID 1 (gpufleet_lab/hosts.py), so both servers run as the systemd services
deploys/cache.py installs: Debian's apt-cacher-ng unit and gpufleet's devpi-server unit, for real.

The upstreams are https (the lab's mirrors with a certificate of the lab's own CA, which every lab host trusts:
gpufleet_lab/tls.py): apt-cacher-ng's remap of cuda_repo_url, its CONNECT pass-through and devpi-server's mirror
indexes all fetch over TLS, verified. The hosts' Debian OS mirror stays plain http, as deb.debian.org is.
"""

import json
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from packaging.utils import canonicalize_name

from gpufleet import cache
from gpufleet.cache_stats import DEVPI_LOG
from gpufleet_lab import Lab, mirrors
from gpufleet_lab.hosts import Host
from gpufleet_lab.paths import BRIDGE_IP, MIRROR_HTTPS_PORT, MIRROR_PORT, mirror_https_url

pytestmark = pytest.mark.lab

DEPLOY = Path(__file__).parent / "deploys" / "cache_clients.py"
PACKAGE_FILE = (".deb", ".whl", ".tar.gz")


def cache_inventory(lab: Lab, path: Path, cache_host: Host, clients: list[Host]) -> Path:
    """The lab's YAML inventory with `cache_host` moved to the group cache; https upstreams."""
    lab.write_inventory_yaml(path, [cache_host, *clients], settings=lab.https_mirror_settings())
    document = yaml.safe_load(path.read_text())
    workstations = document["groups"]["workstations"]["hosts"]
    document["groups"]["cache"] = {"hosts": {cache_host.name: workstations.pop(cache_host.name)}}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def mirror_requests(lab: Lab, since: dict[Path, int], logs: tuple[Path, ...] = ()) -> list[tuple[str, str, int]]:
    """What the upstream mirrors served since `since` (log_offset): both servers' access logs, or only `logs`."""
    return [request for log, offset in since.items() if not logs or log in logs
            for request in mirrors.access_log(log.read_text()[offset:])]


def log_offset(lab: Lab) -> dict[Path, int]:
    return {log: len(log.read_text()) for log in (lab.mirror_log, lab.https_mirror_log)}


def service_property(lab: Lab, host: Host, unit: str, name: str) -> str:
    shown = lab.ssh(host, f"systemctl show -P {name} {unit}")
    assert shown.returncode == 0, f"{host.name}: {shown.stderr}"
    return shown.stdout.strip()


def wait_active(lab: Lab, host: Host, units: list[str], other_than_pid: str = "", timeout: float = 60) -> None:
    """Until every unit is active (and the first one's main process is not `other_than_pid`); fails after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        states = lab.ssh(host, f"systemctl is-active {' '.join(units)}").stdout.split()
        pid = service_property(lab, host, units[0], "MainPID")
        if states == ["active"] * len(units) and pid not in ("0", other_than_pid):
            return
        assert time.monotonic() < deadline, f"{host.name}: {units} are {states}, main PID {pid}"
        time.sleep(0.5)


@pytest.fixture
def systemd_hosts(lab: Lab):
    created = lab.add_hosts(3, systemd=True)
    yield created
    for host in created:
        lab.remove_host(host)


@pytest.fixture
def cache_lab(lab: Lab, systemd_hosts: list[Host], tmp_path: Path):
    cache_host = lab.add_host(gpu="none", systemd=True)
    try:
        yield cache_host, systemd_hosts, cache_inventory(lab, tmp_path / "inventory.yaml", cache_host, systemd_hosts)
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
    # The CUDA repository, the wheels and the sdist came over https; only the hosts' Debian mirror is plain http.
    plain = {path for _, path, status in mirror_requests(lab, start, (lab.mirror_log,)) if status == 200}
    tls = {path for _, path, status in mirror_requests(lab, start, (lab.https_mirror_log,)) if status == 200}
    assert set(client_wheels) <= tls and {p for p in debs if "/cuda/repos/" in p} <= tls, per_file
    assert not {p for p in plain if p.startswith(("/cuda/", "/simple/", "/packages/", "/files/"))}, plain
    for client in clients:
        check = lab.ssh(client, "dpkg -s patch >/dev/null && /opt/gpufleet-cache-test/venv/bin/python -c "
                                "'import torch, ninja; print(torch.__version__)'")
        assert check.returncode == 0, f"{client.name}: {check.stderr}"
        assert "+cu128" in check.stdout

    assert_cache_stats_match_the_clients(lab, inventory, cache_host, clients)

    run_pyinfra(inventory, DEPLOY).assert_no_changes(names)

    assert lab.ssh(cache_host, "systemctl stop apt-cacher-ng.service").returncode == 0
    monkeypatch.setenv("CACHE_TEST_PACKAGES", "patch ccache")
    # Only a client: the cache host's own run would start apt-cacher-ng again (systemd does not: it was stopped).
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

    # Without the cache each client goes to the https upstreams itself, trusting the lab CA as any internal CA.
    plain = lab.write_inventory_yaml(tmp_path / "plain.yaml", clients, settings=lab.https_mirror_settings())
    run_pyinfra(plain, DEPLOY).assert_converged([c.name for c in clients])
    for client in clients:
        assert lab.ssh(client, "test -e /etc/apt/apt.conf.d/01gpufleet-cache-proxy").returncode == 1, client.name
        conf = lab.ssh(client, "cat /opt/gpufleet-cache-test/venv/pip.conf").stdout
        assert f"index-url = {mirror_https_url()}/simple" in conf and ":3141" not in conf, conf


def test_a_workstation_that_serves_the_cache_installs_through_it_too(
        lab: Lab, systemd_hosts: list[Host], run_pyinfra, tmp_path: Path) -> None:
    fresh_hosts = systemd_hosts
    server_host, *clients = fresh_hosts
    path = lab.write_inventory_yaml(tmp_path / "inventory.yaml", fresh_hosts, settings=lab.https_mirror_settings())
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


def test_systemd_alone_restarts_a_killed_cache_and_a_restarted_cache_host_keeps_serving_its_caches(
        lab: Lab, run_pyinfra, tmp_path: Path) -> None:
    cache_host = lab.add_host(gpu="none", systemd=True)
    client = lab.add_host(systemd=True)
    try:
        inventory = cache_inventory(lab, tmp_path / "inventory.yaml", cache_host, [client])
        names = [cache_host.name, client.name]
        run_pyinfra(inventory, DEPLOY).assert_converged(names)
        units = ["apt-cacher-ng.service", "gpufleet-devpi.service"]
        enabled = lab.ssh(cache_host, f"systemctl is-enabled {' '.join(units)}")
        assert enabled.stdout.split() == ["enabled", "enabled"], enabled.stdout + enabled.stderr

        # kill -9: no pyinfra run from here on, systemd alone brings apt-cacher-ng back (Restart=on-failure).
        killed = service_property(lab, cache_host, units[0], "MainPID")
        assert killed != "0" and lab.ssh(cache_host, f"kill -9 {killed}").returncode == 0
        wait_active(lab, cache_host, units[:1], other_than_pid=killed)
        assert service_property(lab, cache_host, units[0], "NRestarts") == "1"
        assert lab.ssh(client, "apt-get update -o Acquire::Retries=0").returncode == 0, "the proxy did not answer"

        # A settings file newer than the running server (a run cut off before its restart): the next run
        # restarts it, decided from the host's state, and the run after that changes nothing.
        lab.ssh(cache_host, f"sleep 1.1; touch {cache.ACNG_CONF} {cache.DEVPI_UNIT}")
        repair = run_pyinfra(inventory, DEPLOY, "--limit", cache_host.name)
        repair.assert_converged([cache_host.name])
        changed = " ".join(str(op) for op in repair.changes(cache_host.name))
        for restarted in ("Restart apt-cacher-ng", "Make systemd read the devpi-server unit", "Restart devpi-server"):
            assert restarted in changed, repair.changes(cache_host.name)

        # The lab's reboot: systemd powers off, boots again on the same disk and starts the enabled services.
        start = log_offset(lab)
        lab.restart_host(cache_host)
        wait_active(lab, cache_host, units)
        assert lab.ssh(cache_host, "systemctl show -P NRestarts apt-cacher-ng.service").stdout.strip() == "0"
        # devpi-server is active as soon as it runs; it answers once it has opened its store.
        answered = lab.ssh(client, f"for i in $(seq 240); do curl -fsS -o /dev/null http://{cache_host.ip}:3141/+api "
                                   "&& exit 0; sleep 0.5; done; exit 1", timeout=180)
        assert answered.returncode == 0, (
            f"devpi-server on {cache_host.name} did not answer after the restart:\n"
            + lab.ssh(cache_host, "systemctl status --no-pager gpufleet-devpi; ss -ltn; "
                                  f"tail -n 20 {DEVPI_LOG}").stdout)
        # What the cache held before the restart is served from it: nothing crosses the uplink again.
        fetch = lab.ssh(client, "set -e; d=$(mktemp -d); cd $d; apt-get download patch cuda-toolkit-12-8; "
                                "/opt/gpufleet-cache-test/venv/bin/pip download -q --no-deps --no-cache-dir "
                                "-d $d ninja wheel; ls $d; rm -rf $d")
        assert fetch.returncode == 0, fetch.stderr
        assert re.search(r"^patch_.*\.deb$", fetch.stdout, re.M) and re.search(r"^ninja-.*\.whl$", fetch.stdout, re.M)
        again = [(ip, path) for ip, path, status in mirror_requests(lab, start) if path.endswith(PACKAGE_FILE)]
        assert again == [], again
        run_pyinfra(inventory, DEPLOY).assert_no_changes(names)
    finally:
        lab.remove_host(client)
        lab.remove_host(cache_host)


def test_a_wsl_cache_host_without_systemd_is_refused_before_anything_changes(
        lab: Lab, run_pyinfra, tmp_path: Path) -> None:
    # A lab WSL host has sshd as its PID 1, as a WSL distribution without `systemd=true` has no systemd.
    wsl = lab.add_host(gpu="none", platform="wsl")
    try:
        inventory = lab.write_inventory_yaml(tmp_path / "inventory.yaml", [wsl])
        document = yaml.safe_load(inventory.read_text())
        document["groups"]["cache"] = {"hosts": {wsl.name: document["groups"]["wsl"]["hosts"].pop(wsl.name)}}
        inventory.write_text(yaml.safe_dump(document, sort_keys=False))
        before = lab.ssh(wsl, "find /etc /opt /var/cache /var/log -newer /etc/hostname | sort").stdout
        refused = run_pyinfra(inventory, DEPLOY)
        assert refused.returncode != 0, refused.explain()
        refusal = f"gpufleet refuses this host: {wsl.name} is in the inventory group `cache`, but systemd is not"
        assert refusal in refused.stderr, refused.explain()
        assert "`[boot]` and `systemd=true` in /etc/wsl.conf, run `wsl --shutdown`" in refused.stderr
        assert lab.ssh(wsl, "find /etc /opt /var/cache /var/log -newer /etc/hostname | sort").stdout == before
        assert lab.ssh(wsl, "test -e /etc/apt-cacher-ng || test -e /etc/gpufleet-cache").returncode == 1
    finally:
        lab.remove_host(wsl)


def test_apt_cacher_ng_tunnels_https_only_to_the_upstreams_and_devpi_needs_the_system_bundle(
        lab: Lab, cache_lab, run_pyinfra) -> None:
    cache_host, clients, inventory = cache_lab
    run_pyinfra(inventory, DEPLOY).assert_converged([cache_host.name, *(c.name for c in clients)])
    client, proxy = clients[0], f"http://{cache_host.ip}:3142"
    start = log_offset(lab)
    # apt on a client, an https source that is not remapped: through apt-cacher-ng's CONNECT tunnel (the client's
    # drop-in), TLS end to end, the certificate verified by the client's apt against its system store.
    source = (f"deb [signed-by=/usr/share/keyrings/gpufleet-lab-archive.gpg] "
              f"{mirror_https_url()}/cuda/repos/debian12/x86_64/ /")
    update = lab.ssh(client, f"d=$(mktemp -d) && mkdir -p $d/lists/partial && echo '{source}' > $d/sources.list && "
                             f"apt-get -o Dir::Etc::SourceList=$d/sources.list -o Dir::Etc::SourceParts=$d/none "
                             f"-o Dir::State::Lists=$d/lists update; rc=$?; rm -rf $d; exit $rc")
    assert update.returncode == 0 and "Err:" not in update.stdout, update.stdout + update.stderr
    tunnelled = mirror_requests(lab, start, (lab.https_mirror_log,))
    assert any(path.endswith("/debian12/x86_64/InRelease") for _, path, _ in tunnelled), tunnelled
    assert {ip for ip, _, _ in tunnelled} == {cache_host.ip}, "the client reached the upstream around the proxy"
    # Anything but the upstreams' https host:port is refused: the same address at its plain port, another host.
    for target in (f"{BRIDGE_IP}:{MIRROR_PORT}", f"{clients[1].ip}:22", f"{BRIDGE_IP}:{MIRROR_HTTPS_PORT + 1}"):
        refused = lab.ssh(client, f"curl -sS -o /dev/null -w '%{{http_connect}}' --proxy {proxy} https://{target}/")
        assert refused.returncode != 0 and refused.stdout.strip() == "403", (target, refused.stdout, refused.stderr)

    # devpi-server fetched from the https upstream (the wheels and sdist above) because deploys/cache.py points it at
    # the system bundle: with the bundle it would take by default (certifi's), the lab CA, like any internal CA the
    # admin installed, is refused.
    probe = ("import ssl, sys, urllib.request, requests.utils\n"
             "for cafile in (requests.utils.DEFAULT_CA_BUNDLE_PATH, '/etc/ssl/certs/ca-certificates.crt'):\n"
             "    try:\n"
             "        urllib.request.urlopen(sys.argv[1], context=ssl.create_default_context(cafile=cafile))\n"
             "        print('verified')\n"
             "    except urllib.error.URLError as error:\n"
             "        print('refused', error.reason)\n")
    answer = lab.ssh(cache_host, f"/opt/gpufleet/cache-venv/bin/python -c {shlex.quote(probe)} "
                                 f"{mirror_https_url()}/simple/")
    lines = answer.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("refused") and "CERTIFICATE_VERIFY_FAILED" in lines[0], answer
    assert lines[1] == "verified", answer
    environment = lab.ssh(cache_host, "tr '\\0' '\\n' < /proc/$(pgrep -o -u gpufleet-cache -f devpi-server)/environ")
    assert "REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt" in environment.stdout.splitlines(), environment
