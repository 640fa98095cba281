"""The optional fleet download cache: one host of the inventory group `cache` runs apt-cacher-ng (apt) and
devpi-server (Python packages); every host reaches apt and pip through it, so a package file crosses the
uplink once however many workstations install it.

Why devpi-server for Python: it is the long-maintained PyPI caching server, its mirror indexes cache every
file they serve on first request, and a mirror index can front any PEP 503 index (PyPI and PyTorch's alike),
so both of gpufleet's indexes are cached by one process with one on-disk store.

Pure functions here (URLs, configuration text, log statistics) are unit-tested; the facts read the cache
servers' state on a host.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from pyinfra.api import FactBase

from gpufleet.decide import driver_packages

PYPI_SIMPLE = "https://pypi.org/simple/"
# apt-cacher-ng's virtual directory for cuda_repo_url: https repositories are cached only through a remap.
CUDA_REMAP = "gpufleet-cuda"
APT_DROPIN = "/etc/apt/apt.conf.d/01gpufleet-cache-proxy"
ACNG_CONF = "/etc/apt-cacher-ng/zz_gpufleet.conf"
DEVPI_UNIT = "/etc/systemd/system/gpufleet-devpi.service"
# devpi's mirror index names: PyPI (or pip_index_url) and PyTorch's index (torch_index_url).
PYPI_INDEX = "root/pypi"
TORCH_INDEX = "root/pytorch"


def listen_addresses(config: dict[str, Any], own_address: str) -> list[str]:
    """Where the servers listen: the cache_listen setting, else the host's inventory address; loopback always."""
    chosen = list(config["cache_listen"]) or [own_address]
    return chosen + [a for a in ("127.0.0.1",) if a not in chosen]


def _index(base: str, index: str) -> str:
    return f"{base}/{index}/+simple/"


def mirror_urls(config: dict[str, Any]) -> dict[str, str]:
    """devpi mirror index -> the upstream it fronts; one mirror when PyPI and torch come from the same index."""
    pypi = config["pip_index_url"] or PYPI_SIMPLE
    mirrors = {PYPI_INDEX: pypi}
    if config["torch_index_url"].rstrip("/") != pypi.rstrip("/"):
        mirrors[TORCH_INDEX] = config["torch_index_url"]
    return mirrors


def through_cache(config: dict[str, Any], cache_address: str | None) -> dict[str, Any]:
    """A host's settings as it uses them: with a cache, both pip indexes are the cache's devpi mirrors.

    Without a cache (cache_address None) the settings are returned unchanged.
    """
    if not cache_address:
        return config
    base = f"http://{cache_address}:{config['cache_pip_port']}"
    mirrors = mirror_urls(config)
    view = dict(config)
    view["pip_index_url"] = _index(base, PYPI_INDEX)
    view["torch_index_url"] = _index(base, TORCH_INDEX if TORCH_INDEX in mirrors else PYPI_INDEX)
    view["pip_trusted_hosts"] = list(dict.fromkeys([*config["pip_trusted_hosts"], cache_address]))
    view["xformers_source_url"] = sdist_url(base, config)
    view["cuda_repo_url"] = f"http://{cache_address}:{config['cache_apt_port']}/{CUDA_REMAP}"
    return view


def sdist_url(base: str, config: dict[str, Any]) -> str:
    """Where devpi's PyPI mirror serves the xformers sdist: its file path is derived from the sha256 we pin."""
    sha = config["xformers_source_sha256"]
    name = urlparse(config["xformers_source_url"]).path.rsplit("/", 1)[-1]
    return f"{base}/{PYPI_INDEX}/+f/{sha[:3]}/{sha[3:16]}/{name}"


def warm_commands(config: dict[str, Any], python: str, base: str, packages: list[str], dest: str) -> list[str]:
    """pip downloads through the cache of the fleet's pinned packages (with dependencies), one process at a time.

    devpi fetches a file once per concurrent first request, so hosts asking at the same moment would each cause
    an upstream download; fetched here first, every host's request is a hit.
    """
    cache_host = base.split("//", 1)[1].rsplit(":", 1)[0]
    view = through_cache(config, cache_host)
    common = shlex.join([python, "-m", "pip", "download", "--no-cache-dir", "--disable-pip-version-check", "-q",
                         "-d", dest, "--only-binary", ":all:", "--python-version", config["python_version"],
                         "--trusted-host", cache_host])
    torch_pre = " --pre" if config["torch_channel"] == "nightly" else ""
    # devpi knows a file once it has read the project's page; then the sdist is fetched into the cache.
    return [
        f"curl -fsS -o /dev/null {shlex.quote(_index(base, PYPI_INDEX) + 'xformers/')}",
        f"curl -fsS -o /dev/null {shlex.quote(sdist_url(base, config))}",
        f"{common} --index-url {shlex.quote(view['pip_index_url'])} {shlex.join(packages)}",
        f"{common}{torch_pre} --index-url {shlex.quote(view['torch_index_url'])} "
        f"--extra-index-url {shlex.quote(view['pip_index_url'])} {shlex.quote('torch==' + config['torch_version'])}",
    ]


def apt_warm_packages(config: dict[str, Any], kernels: list[str]) -> list[str]:
    """Debian packages the fleet's deploys install: driver, toolkit, venv module, build tools, each kernel's headers.

    A superset is harmless (fetched once more into the cache); names a host's repositories lack are skipped.
    """
    tools = ["g++", "make", "patch"] + (["ccache"] if config["xformers_ccache"] else [])
    # A kernel release comes from each host's `uname -r`: only a plain Debian package name goes on.
    kernels = [k for k in kernels if is_kernel_release(k)]
    return sorted({
        *driver_packages(config["driver_source"], config["driver_branch"], config["driver_flavour"]),
        "cuda-toolkit-" + config["cuda_version"].replace(".", "-"),
        "python3-venv", f"python{config['python_version']}-dev", *tools,
        *(f"linux-headers-{k}" for k in kernels),
    })


def apt_warm_commands(config: dict[str, Any], repo_dirs: list[str], packages: list[str], scratch: str) -> list[str]:
    """apt downloads through this host's apt-cacher-ng of `packages` with every dependency, as for an empty host.

    apt-cacher-ng can fetch a file once per client asking in the same instant, so clients installing together
    could each cause an upstream download; fetched here first, every client's request is a hit. A throwaway
    status (nothing installed) makes apt fetch what this host already has; the host's own sources plus the CUDA
    repositories at the cache's remap, the URLs the clients use.
    """
    base = f"http://127.0.0.1:{int(config['cache_apt_port'])}"
    options = " ".join(f"-o {shlex.quote(o)}" for o in (
        f"Dir::State::Lists={scratch}/lists", f"Dir::State::status={scratch}/status", f"Dir::Cache={scratch}/cache",
        f"Dir::Cache::archives={scratch}/archives", f"Dir::Etc::SourceParts={scratch}/parts",
        "Debug::NoLocking=1", f"Acquire::http::Proxy={base}", "Acquire::http::Proxy::127.0.0.1=DIRECT",
        # One request at a time: a whole closure pipelined to an upstream that closes after each answer (HTTP/1.0)
        # used up apt-cacher-ng's retries ("503 Connection closed, check DlMaxRetries").
        "Acquire::http::Pipeline-Depth=0", "Acquire::Retries=3"))
    # Nothing fetched here is installed: the clients check the repository signatures themselves.
    cuda = "".join(f"deb [trusted=yes] {base}/{CUDA_REMAP}/{d}/x86_64/ /\n" for d in repo_dirs)
    wanted = shlex.join(p for p in packages if _PACKAGE.fullmatch(p))
    s = shlex.quote(scratch)
    return [
        f"rm -rf {s} && mkdir -p {s}/lists/partial {s}/archives/partial {s}/cache {s}/parts && touch {s}/status",
        f"for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do "
        f"[ -f \"$f\" ] && cp \"$f\" {s}/parts/; done; true",
        f"printf '%s' {shlex.quote(cuda)} > {s}/parts/zz-gpufleet-warm-cuda.list",
        # The init script returns before the daemon listens.
        f"for i in $(seq 100); do curl -s -o /dev/null {base}/ && break; sleep 0.1; done",
        f"apt-get -q {options} update",
        f"apt-get -q -y {options} install --download-only $(for p in {wanted}; do "
        f"apt-cache {options} show \"$p\" >/dev/null 2>&1 && echo \"$p\"; done)",
        f"rm -rf {s}",
    ]


# A Debian package name, and a kernel release as `uname -r` prints it on Debian and Ubuntu (6.8.0-45-generic).
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,127}")
_KERNEL_RELEASE = re.compile(r"[0-9]+\.[0-9]+[a-z0-9.+-]{0,100}")


def is_kernel_release(text: str) -> bool:
    """Whether a host's `uname -r` is a plain kernel release: it is written into a root shell on the cache host."""
    return bool(_KERNEL_RELEASE.fullmatch(text))


def apt_proxy_dropin(config: dict[str, Any], cache_address: str) -> str:
    """apt through apt-cacher-ng: http repositories are cached; https ones pass through its CONNECT tunnel."""
    proxy = f"http://{cache_address}:{config['cache_apt_port']}"
    return (f'Acquire::http::Proxy "{proxy}";\n'
            f'Acquire::https::Proxy "{proxy}";\n'
            # The CUDA repository is addressed to the cache itself (its remap), so apt goes there directly.
            f'Acquire::http::Proxy::{cache_address} "DIRECT";\n')


def upstream_ports(config: dict[str, Any]) -> list[int]:
    """Ports apt-cacher-ng may fetch from: 80 and those of the configured mirrors (it refuses others)."""
    ports = {80}
    for key in ("cuda_repo_url", "pip_index_url", "torch_index_url", "xformers_source_url"):
        url = urlparse(config[key] or "")
        if url.scheme == "http" and url.port:
            ports.add(url.port)
    return sorted(ports)


def acng_config(config: dict[str, Any], listen: list[str]) -> str:
    """apt-cacher-ng settings gpufleet owns, read after the package's acng.conf (files are read in order)."""
    return "\n".join([
        "# Written by gpufleet (deploys/cache.py); settings: cache_dir, cache_listen, cache_apt_port.",
        f"CacheDir: {config['cache_dir']}/apt",
        "LogDir: /var/log/apt-cacher-ng",
        f"Port: {config['cache_apt_port']}",
        f"BindAddress: {' '.join(listen)}",
        f"AllowUserPorts: {' '.join(str(p) for p in upstream_ports(config))}",
        # cuda_repo_url (https at NVIDIA) as a virtual directory of the cache: fetched once, cached for all.
        f"Remap-{CUDA_REMAP}: /{CUDA_REMAP} ; {config['cuda_repo_url'].rstrip('/')}",
        # Only the configured upstreams' https hosts go through as CONNECT tunnels: never an open proxy.
        f"PassThroughPattern: {pass_through_pattern(config)}",
        # Never serve what the report page's maintenance would delete without asking.
        "ExThreshold: 4",
        "",
    ])


def pass_through_pattern(config: dict[str, Any]) -> str:
    """apt-cacher-ng's regular expression of host:port it tunnels: the https upstream hosts of the settings."""
    hosts = sorted({url.hostname for key in UPSTREAM_SETTINGS if config.get(key)
                    for url in [urlparse(config[key])] if url.scheme == "https" and url.hostname})
    if not hosts:
        return "^$"
    return "^(" + "|".join(re.escape(h) for h in hosts) + "):443$"


UPSTREAM_SETTINGS = ("cuda_repo_url", "pip_index_url", "torch_index_url", "xformers_source_url")


def devpi_command(venv: str, config: dict[str, Any], listen: list[str]) -> list[str]:
    command = [f"{venv}/bin/devpi-server", "--serverdir", f"{config['cache_dir']}/pypi"]
    for address in listen:
        command += ["--listen", f"{address}:{config['cache_pip_port']}"]
    return command


def devpi_unit(command: list[str], user: str) -> str:
    return "\n".join([
        "[Unit]",
        "Description=gpufleet fleet cache: devpi-server mirroring PyPI and the PyTorch index",
        "After=network-online.target",
        "",
        "[Service]",
        f"User={user}",
        f"ExecStart={' '.join(command)}",
        "Restart=on-failure",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def devpi_auth_header(user: str, token: str) -> str:
    """devpi's X-Devpi-Auth value for a login token (what devpi-client sends)."""
    return base64.b64encode(f"{user}:{token}".encode()).decode()


@dataclass
class CacheStats:
    """What a cache server says it served: requests answered from its cache or fetched upstream, in bytes."""
    server: str
    hits: int = 0
    misses: int = 0
    bytes_served: int = 0
    bytes_fetched: int = 0

    @property
    def bytes_saved(self) -> int:
        return max(self.bytes_served - self.bytes_fetched, 0)


# apt-cacher-ng's transfer log: "time|O|bytes|client|path" for bytes sent to a client, "time|I|bytes|..." for
# bytes it fetched upstream; a miss is a path with both, a hit a path sent without an upstream fetch.
_ACNG_LINE = re.compile(r"^\d+\|([IO])\|(\d+)\|[^|]*\|(.+)$")


def acng_stats(log_text: str) -> CacheStats:
    """Each upstream fetch ("I") makes the next send of that path ("O") a miss; every other send is a hit."""
    stats = CacheStats("apt-cacher-ng")
    pending: dict[str, int] = {}
    for line in log_text.splitlines():
        match = _ACNG_LINE.match(line.strip())
        if not match:
            continue
        kind, size, path = match.group(1), int(match.group(2)), match.group(3)
        if kind == "I":
            stats.bytes_fetched += size
            pending[path] = pending.get(path, 0) + 1
            continue
        stats.bytes_served += size
        if pending.get(path):
            stats.misses += 1
            pending[path] -= 1
        else:
            stats.hits += 1
    return stats


_DEVPI_SERVED = re.compile(r"\] GET /(\S+/\+f/\S+)$")
_DEVPI_FETCHED = re.compile(r"reading remote: .*, target (\S+/\+f/\S+)$")


def devpi_stats(log_text: str, file_sizes: dict[str, int]) -> CacheStats:
    """devpi's own log: every "GET /<index>/+f/<file>" is a file served; one with a "reading remote: ..., target
    <index>/+f/<file>" line is a miss (fetched upstream), the others are hits.

    `file_sizes` maps "<index>/+f/<file>" to the size of the cached file (devpi's serverdir/+files tree).
    """
    stats = CacheStats("devpi-server")
    served: list[str] = []
    fetched: set[str] = set()
    for line in log_text.splitlines():
        line = line.rstrip()
        if match := _DEVPI_SERVED.search(line):
            served.append(match.group(1))
        elif match := _DEVPI_FETCHED.search(line):
            fetched.add(match.group(1))
    for path in served:
        size = file_sizes.get(path, 0)
        stats.bytes_served += size
        if path in fetched:
            stats.misses += 1
            stats.bytes_fetched += size
            fetched.discard(path)
        else:
            stats.hits += 1
    return stats


class ListeningPorts(FactBase):
    """TCP ports something listens on (ss -ltn), as a set of ints."""

    command = "ss -Hltn 2>/dev/null || true"
    default = set

    def process(self, output: list[str]) -> set[int]:
        ports = set()
        for line in output:
            fields = line.split()
            if len(fields) >= 4 and ":" in fields[3]:
                port = fields[3].rsplit(":", 1)[1]
                if port.isdigit():
                    ports.add(int(port))
        return ports


class HasSystemd(FactBase):
    """Whether systemd is PID 1 (the test lab's hosts run without it)."""

    command = "test -d /run/systemd/system && echo yes || echo no"

    def process(self, output: list[str]) -> bool:
        return bool(output) and output[0].strip() == "yes"


class DevpiMirrors(FactBase):
    """devpi index -> its mirror_url, read from a running devpi-server; {} when it does not answer."""

    def command(self, base: str, indexes: list[str]) -> str:
        reads = " ; ".join(
            f"printf '%s ' {shlex.quote(i)}; curl -fsS -H 'Accept: application/json' {shlex.quote(f'{base}/{i}')} "
            "| tr -d '\\n'; echo"
            for i in indexes)
        return f"( {reads} ) 2>/dev/null || true"

    def process(self, output: list[str]) -> dict[str, str]:
        found = {}
        for line in output:
            index, _, body = line.partition(" ")
            try:
                found[index] = json.loads(body)["result"].get("mirror_url", "")
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
        return found


ACNG_LOG = "/var/log/apt-cacher-ng/apt-cacher.log"
DEVPI_LOG = "/var/log/gpufleet-cache/devpi.log"
_SECTION = "=== gpufleet-cache-stats {} ==="


def stats_command(cache_dir: str) -> str:
    """Shell command for the cache host printing both servers' logs and the sizes of devpi's cached files."""
    return "; ".join([
        f"echo '{_SECTION.format('acng')}'", f"cat {ACNG_LOG} 2>/dev/null",
        f"echo '{_SECTION.format('devpi')}'", f"cat {DEVPI_LOG} 2>/dev/null",
        f"echo '{_SECTION.format('files')}'",
        f"find {shlex.quote(cache_dir + '/pypi/+files')} -type f -printf '%s %P\\n' 2>/dev/null",
        "true",
    ])


def parse_stats_output(text: str) -> list[CacheStats]:
    """The two servers' statistics from what stats_command printed."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^=== gpufleet-cache-stats (\w+) ===$", line)
        if match:
            current = match.group(1)
            sections[current] = []
        elif current:
            sections[current].append(line)
    sizes = {}
    for line in sections.get("files", []):
        size, _, path = line.partition(" ")
        if size.isdigit():
            sizes[path] = int(size)
    return [acng_stats("\n".join(sections.get("acng", []))),
            devpi_stats("\n".join(sections.get("devpi", [])), sizes)]
