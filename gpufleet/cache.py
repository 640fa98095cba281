"""The optional fleet download cache: one host of the inventory group `cache` runs apt-cacher-ng (apt) and
devpi-server (Python packages); every host reaches apt and pip through it, so a package file crosses the
uplink once however many workstations install it.

Why devpi-server for Python: it is the long-maintained PyPI caching server, its mirror indexes cache every
file they serve on first request, and a mirror index can front any PEP 503 index (PyPI and PyTorch's alike),
so both of gpufleet's indexes are cached by one process with one on-disk store.

Pure functions here (the settings as a host uses them, configuration text, warm-up commands) are unit-tested;
the facts that read the servers' state are in gpufleet.facts, their log statistics in gpufleet.cache_stats.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlparse

from gpufleet.decide import driver_packages

PYPI_SIMPLE = "https://pypi.org/simple/"
# apt-cacher-ng's virtual directory for cuda_repo_url: https repositories are cached only through a remap.
CUDA_REMAP = "gpufleet-cuda"
APT_DROPIN = "/etc/apt/apt.conf.d/01gpufleet-cache-proxy"
ACNG_CONF = "/etc/apt-cacher-ng/zz_gpufleet.conf"
DEVPI_SERVICE = "gpufleet-devpi.service"
DEVPI_UNIT = f"/etc/systemd/system/{DEVPI_SERVICE}"
ACNG_SERVICE = "apt-cacher-ng.service"
# The OS's CA bundle on Ubuntu and Debian (package ca-certificates): public CAs plus those the admin added.
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
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


def upstream_ports(config: dict[str, Any], apt_sources: Iterable[str] = (), own: Iterable[str] = ()) -> list[int]:
    """Ports apt-cacher-ng may fetch from (it refuses others): 80, those of the configured http mirrors, and those
    of the fleet's own http apt sources (an internal OS mirror at :8080); sources on the cache itself (`own`
    addresses: its remap) are not upstreams."""
    ports = {80}
    own = set(own)
    urls = [config[key] or "" for key in UPSTREAM_SETTINGS]
    urls += [u for u in apt_sources if urlparse(u).hostname not in own]
    for text in urls:
        url = urlparse(text)
        try:
            port = url.port
        except ValueError:  # not a port: apt cannot use that source either
            continue
        if url.scheme == "http" and port:
            ports.add(port)
    return sorted(ports)


def acng_config(config: dict[str, Any], listen: list[str], apt_sources: Iterable[str] = ()) -> str:
    """apt-cacher-ng settings gpufleet owns, read after the package's acng.conf (files are read in order);
    `apt_sources` the URLs of the fleet's apt sources (their ports are allowed)."""
    return "\n".join([
        "# Written by gpufleet (deploys/cache.py); settings: cache_dir, cache_listen, cache_apt_port.",
        f"CacheDir: {config['cache_dir']}/apt",
        "LogDir: /var/log/apt-cacher-ng",
        f"Port: {config['cache_apt_port']}",
        f"BindAddress: {' '.join(listen)}",
        f"AllowUserPorts: {' '.join(str(p) for p in upstream_ports(config, apt_sources, listen))}",
        # cuda_repo_url (https at NVIDIA) as a virtual directory of the cache: fetched once, cached for all.
        f"Remap-{CUDA_REMAP}: /{CUDA_REMAP} ; {config['cuda_repo_url'].rstrip('/')}",
        # Only the configured upstreams' https hosts go through as CONNECT tunnels: never an open proxy.
        f"PassThroughPattern: {pass_through_pattern(config)}",
        # Never serve what the report page's maintenance would delete without asking.
        "ExThreshold: 4",
        "",
    ])


def pass_through_pattern(config: dict[str, Any]) -> str:
    """apt-cacher-ng's regular expression of host:port it tunnels: the https upstreams of the settings, each at its
    own port (443 unless the URL names another)."""
    targets = sorted({f"{url.hostname}:{url.port or 443}" for key in UPSTREAM_SETTINGS if config.get(key)
                      for url in [urlparse(config[key])] if url.scheme == "https" and url.hostname})
    if not targets:
        return "^$"
    return "^(" + "|".join(re.escape(t) for t in targets) + ")$"


UPSTREAM_SETTINGS = ("cuda_repo_url", "pip_index_url", "torch_index_url", "xformers_source_url")


# devpi-server's logging (--logger-cfg): its default format, plus the client's address on each request line
# (files/cache/gpufleet_devpi_log.py), by which `gpufleet cache-stats` counts bytes per client. Root's files.
DEVPI_LOG_FILTER_DIR = "/usr/local/lib/gpufleet/devpi-log"
DEVPI_LOG_FILTER = f"{DEVPI_LOG_FILTER_DIR}/gpufleet_devpi_log.py"
DEVPI_LOGGING = "/usr/local/lib/gpufleet/devpi-logging.json"


def devpi_logging_config() -> str:
    """devpi-server's --logger-cfg: its own default format and level, to stdout, with the client-address filter."""
    return json.dumps({
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"client": {"()": "gpufleet_devpi_log.ClientAddressFilter"}},
        "formatters": {"devpi": {"format": "%(asctime)s %(levelname)-5.5s %(message)s"}},
        "handlers": {"stdout": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout",
                                "formatter": "devpi", "filters": ["client"]}},
        "root": {"level": "INFO", "handlers": ["stdout"]},
    }, indent=1) + "\n"


def devpi_command(venv: str, config: dict[str, Any], listen: list[str]) -> list[str]:
    command = [f"{venv}/bin/devpi-server", "--serverdir", f"{config['cache_dir']}/pypi", "--logger-cfg", DEVPI_LOGGING]
    for address in listen:
        command += ["--listen", f"{address}:{config['cache_pip_port']}"]
    return command


def devpi_environment() -> dict[str, str]:
    """devpi-server's environment: gpufleet's log filter importable (it names each request's client), and the system
    CA bundle for https upstreams. devpi-server verifies against certifi's bundle (requests' default), not the host's
    trust store, so an internal CA the admin installed (update-ca-certificates) would be refused; the system bundle
    holds both."""
    return {"REQUESTS_CA_BUNDLE": SYSTEM_CA_BUNDLE, "PYTHONPATH": DEVPI_LOG_FILTER_DIR}


def no_systemd_problem(host_name: str, wsl: bool) -> str:
    """Why a host without systemd as PID 1 cannot serve the cache, and what makes it able to."""
    why = (f"{host_name} is in the inventory group `cache`, but systemd is not its PID 1 (no /run/systemd/system), "
           "and gpufleet runs apt-cacher-ng and devpi-server only as systemd services. ")
    if wsl:
        return why + ("Turn systemd on in this WSL distribution: put `[boot]` and `systemd=true` in /etc/wsl.conf, "
                      "run `wsl --shutdown` on Windows, start the distribution again and rerun gpufleet; or list "
                      "another host under `cache`.")
    return why + "Boot it with systemd as init, or list another host under `cache`."


def devpi_unit(command: list[str], user: str, log: str, environment: dict[str, str] | None = None) -> str:
    """The devpi-server service: `command` run as `user` with `environment`, its output appended to `log`
    (gpufleet cache-stats reads it), restarted by systemd whenever it fails. The arguments are validated settings
    (no spaces, no %)."""
    return "\n".join([
        "[Unit]",
        "Description=gpufleet fleet cache: devpi-server mirroring PyPI and the PyTorch index",
        "After=network-online.target",
        "",
        "[Service]",
        f"User={user}",
        *(f"Environment={name}={value}" for name, value in sorted((environment or {}).items())),
        f"ExecStart={' '.join(command)}",
        f"StandardOutput=append:{log}",
        "StandardError=inherit",
        "Restart=on-failure",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


# Built wheels through the cache host (issue 15): the builder uploads each built xformers wheel to this private devpi
# index, which inherits from nothing (bases=[]) and accepts uploads from WHEEL_UPLOADER only; every other host
# downloads it from there, sha256 checked, so no wheel byte passes through the control machine.
WHEEL_INDEX = "root/gpufleet"
WHEEL_UPLOADER = "gpufleet-upload"
# What facts.DevpiMirrors reports for WHEEL_INDEX when it is set up as gpufleet wants it.
WHEEL_INDEX_STATE = f"private, uploads by {WHEEL_UPLOADER}"
# On the cache host (root only, 600): the upload user's password. On a builder that is not the cache host, a
# copy in root's own directory, there only while the builder uploads.
UPLOAD_PASSWORD = "/etc/gpufleet-cache/devpi-upload-password"
BUILDER_UPLOAD_PASSWORD = "/var/lib/gpufleet-root/cache-upload/password"
_WHEEL_FILE = re.compile(r"xformers-[A-Za-z0-9_.+-]+\.whl")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_ADDRESS = re.compile(r"[A-Za-z0-9.:_-]+")


def wheel_index_url(cache_address: str, config: dict[str, Any]) -> str:
    """The private wheel index on the cache host, as every host reaches it (no trailing slash)."""
    if not _ADDRESS.fullmatch(cache_address):
        raise ValueError(f"not a host name or IP address: {cache_address!r}")
    return f"http://{cache_address}:{int(config['cache_pip_port'])}/{WHEEL_INDEX}"


def _checked(wheel: str, sha256: str) -> None:
    if not _WHEEL_FILE.fullmatch(wheel) or not _SHA256_HEX.fullmatch(sha256):
        raise ValueError(f"not an xformers wheel name and sha256: {wheel!r} {sha256!r}")


def wheel_file_url(index_url: str, wheel: str, sha256: str) -> str:
    """Where devpi serves an uploaded file: its path is derived from the file's sha256 (+f/abc/def.../name)."""
    _checked(wheel, sha256)
    return f"{index_url}/+f/{sha256[:3]}/{sha256[3:16]}/{wheel}"


def wheel_version(wheel: str) -> str:
    """The version field of a wheel file name (xformers-0.0.35-cp39-abi3-linux_x86_64.whl -> 0.0.35)."""
    parts = wheel.split("-")
    if len(parts) < 5 or not _WHEEL_FILE.fullmatch(wheel):
        raise ValueError(f"not an xformers wheel file name: {wheel!r}")
    return parts[1]


def index_wheel_name(wheel: str, fingerprint: str) -> str:
    """The built wheel's name on the index: its fingerprint as the wheel's build tag (PEP 427: "0" + hex, led by a
    digit), so wheels of different fingerprints, which share a file name, sit side by side on an index that never
    replaces a file. pip installs the file under this name as it is."""
    parts = wheel.split("-")
    if len(parts) != 5 or not _WHEEL_FILE.fullmatch(wheel) or not re.fullmatch(r"[0-9a-f]{8,64}", fingerprint):
        raise ValueError(f"not a wheel file name without a build tag and a fingerprint: {wheel!r} {fingerprint!r}")
    return "-".join([*parts[:2], "0" + fingerprint, *parts[2:]])


def upload_command(index_url: str, password_file: str, wheel_path: str, manifest_json: str) -> str:
    """curl's upload of a staged wheel to the private index, as devpi's upload form (what twine sends).

    The upload user's password goes to curl through a pipe (`-K -`), never on a command line. The manifest is the
    release's description, so the index holds what was built from what. devpi answers 200 to an identical file
    uploaded again, so a repeated upload is harmless.
    """
    wheel = wheel_path.rsplit("/", 1)[-1]
    if not _WHEEL_FILE.fullmatch(wheel):
        raise ValueError(f"not an xformers wheel file name: {wheel!r}")
    # curl's config on stdin: user = "gpufleet-upload:<password>" (the password is base64: no quote in it).
    prefix = shlex.quote('user = "' + WHEEL_UPLOADER + ":")
    credentials = (f"{{ printf '%s' {prefix}; tr -d '\\n' < {shlex.quote(password_file)}; "
                   "printf '\"\\n'; }")
    form = [":action=file_upload", "protocol_version=1", "name=xformers", f"version={wheel_version(wheel)}",
            "filetype=bdist_wheel", "pyversion=" + wheel.split("-")[-3], "description=" + manifest_json]
    # --form-string: the value is taken literally (no @file, <file or ;type= in it).
    fields = " ".join(f"--form-string {shlex.quote(f)}" for f in form)
    return (f"{credentials} | curl -fsS --retry 3 -o /dev/null -K - {fields} "
            f"-F {shlex.quote('content=@' + wheel_path)} {shlex.quote(index_url + '/')}")


def index_files(simple_page: str) -> dict[str, str]:
    """file name -> sha256 of the links on a devpi +simple page (the fragment #sha256=... devpi writes)."""
    found = {}
    for href in re.findall(r'href="([^"]+)"', simple_page):
        path, _, fragment = href.partition("#sha256=")
        name = path.rsplit("/", 1)[-1]
        if _SHA256_HEX.fullmatch(fragment) and _WHEEL_FILE.fullmatch(name):
            found[name] = fragment
    return found
