"""The optional fleet download cache (inventory group `cache`): apt-cacher-ng and devpi-server on the cache host,
apt on every host pointed at it. pip follows through the settings (gpufleet.cache.through_cache), so the venv's
pip.conf and the torch install use the cache's indexes; without a cache host nothing here changes a host except
removing an earlier proxy drop-in. devpi-server also holds the private index built xformers wheels are uploaded to
(gpufleet.cache.WHEEL_INDEX, used by deploys/xformers.py).

Runs alone: pyinfra inventory.py deploys/cache.py (in deploys/full.py it runs first, before any apt use).
Both servers are systemd services, enabled, restarted by systemd when they fail (Restart=on-failure: Debian's
apt-cacher-ng unit has it, gpufleet's devpi unit too) and restarted by a run only when a file they read is newer
than the running service. A cache host without systemd as PID 1 (WSL without systemd) is refused, naming the fix.
"""

import shlex
from io import StringIO
from pathlib import Path

from pyinfra import host, inventory
from pyinfra.api import Host, deploy
from pyinfra.facts.apt import AptSources
from pyinfra.facts.files import File, FileContents
from pyinfra.facts.server import KernelVersion
from pyinfra.operations import apt, files, server, systemd

from gpufleet import cache, facts
from gpufleet.cache_stats import DEVPI_LOG, DEVPI_LOG_DIR
from gpufleet.decide import STAGE_DISK_GB, VENV_TOOLS, DiskNeed, cuda_repo_dir, disk_problems
from gpufleet.nvidia_repo import apt_settings
from gpufleet.operations import pip_packages
from gpufleet.stage import cache_only, free_disk, refuse_host, run_alone, settings

CACHE_USER = "gpufleet-cache"
DEVPI_VENV = "/opt/gpufleet/cache-venv"
DEVPI_VERSION = "6.20.3"
SECRETS_DIR = "/etc/gpufleet-cache"
DEVPI_PASSWORD = f"{SECRETS_DIR}/devpi-root-password"
WARM_STAMP = f"{SECRETS_DIR}/warmed"
APT_WARM_STAMP = f"{SECRETS_DIR}/warmed-apt"
MIRRORS_SCRIPT = "/usr/local/lib/gpufleet/devpi_mirrors.py"
MIRRORS_SOURCE = Path(__file__).resolve().parents[1] / "files" / "cache" / "devpi_mirrors.py"
DEVPI_LOG_SOURCE = Path(__file__).resolve().parents[1] / "files" / "cache" / "gpufleet_devpi_log.py"


def _apt_cacher(config: dict, listen: list[str]) -> None:
    apt_settings(config)
    # Only before the first install: later runs go through this host's own proxy, which may be the one down.
    if host.get_fact(File, path="/usr/sbin/apt-cacher-ng") is None:
        apt.update(name="Refresh apt lists for the cache servers", cache_time=3600)
    # ca-certificates: the system CA bundle both servers verify https upstreams against (cache.SYSTEM_CA_BUNDLE).
    apt.packages(name="Install apt-cacher-ng, Python's venv module, curl and the system CA bundle",
                 packages=["apt-cacher-ng", "python3-venv", "curl", "ca-certificates"])
    files.directory(name=f"Create the apt cache {config['cache_dir']}/apt", path=f"{config['cache_dir']}/apt",
                    user="apt-cacher-ng", group="apt-cacher-ng", mode="755")
    conf = files.put(
        name="Configure apt-cacher-ng (cache_dir, cache_listen, cache_apt_port)",
        src=StringIO(cache.acng_config(config, listen, _fleet_apt_sources())),
        dest=cache.ACNG_CONF,
        mode="644",
    )
    # Read before this run changes anything: a settings file newer than the running daemon (a cut-off run).
    state = host.get_fact(facts.SystemdServiceState, unit=cache.ACNG_SERVICE, paths=[cache.ACNG_CONF])
    systemd.service(name="Run apt-cacher-ng as a systemd service", service=cache.ACNG_SERVICE,
                    running=True, enabled=True)
    # Also when apt started it with the package's own settings during this run.
    systemd.service(name="Restart apt-cacher-ng for its new settings", service=cache.ACNG_SERVICE,
                    restarted=True, _if=lambda: state.stale or conf.did_change())


def _fleet_apt_sources() -> list[str]:
    """The URLs of every apt source of the hosts in this run: apt-cacher-ng must allow their ports."""
    return sorted({str(repo.url) for target in inventory.get_active_hosts()
                   for repo in (target.get_fact(AptSources) or []) if repo.url})


def _repo_dir(target: Host) -> str:
    wsl = target.get_fact(facts.WslInfo) or {"is_wsl": False}
    os_release = target.get_fact(facts.OsInfo) or facts.OsRelease("unknown", "", "", "an unreadable OS")
    return cuda_repo_dir(os_release, wsl["is_wsl"])


def _warm_apt(config: dict) -> None:
    """The packages the fleet's deploys install, fetched once through apt-cacher-ng before any client asks.

    Resolved against this host's own OS repositories: hosts of another distribution (another CUDA repository
    directory) are not warmed, their files are cached on their first request.
    """
    own = _repo_dir(host)
    fleet = [h for h in inventory.get_active_hosts() if _repo_dir(h) == own]
    kernels = sorted({str(h.get_fact(KernelVersion)) for h in fleet})
    packages = cache.apt_warm_packages(config, kernels)
    scratch = f"{config['cache_dir']}/warm-apt"
    warm = cache.apt_warm_commands(config, [own], packages, scratch)
    stamp = "\n".join(warm) + "\n"
    if host.get_fact(FileContents, path=APT_WARM_STAMP) != stamp.splitlines():
        server.shell(name=f"Fetch the fleet's Debian packages into the cache once ({', '.join(packages)})",
                     commands=warm)
        files.put(name="Record which Debian packages the cache holds", src=StringIO(stamp), dest=APT_WARM_STAMP,
                  mode="644")


def _devpi(config: dict, listen: list[str]) -> None:
    server.user(name=f"Create the cache user {CACHE_USER}", user=CACHE_USER, system=True, create_home=False,
                home=f"{config['cache_dir']}/pypi", shell="/usr/sbin/nologin")
    for path, owner, mode in ((DEVPI_VENV, "root", "755"), (SECRETS_DIR, "root", "700"),
                              (DEVPI_LOG_DIR, CACHE_USER, "755"), (config["cache_dir"], "root", "755")):
        files.directory(name=f"Create {path}", path=path, user=owner, group=owner, mode=mode)
    venv_python = f"{DEVPI_VENV}/bin/python"
    has_venv = host.get_fact(File, path=venv_python) is not None
    server.shell(name=f"Create the venv {DEVPI_VENV} for devpi-server", commands=[f"python3 -m venv {DEVPI_VENV}"],
                 _if=lambda: not has_venv)
    # devpi itself comes from the upstream index: the cache cannot serve its own installation.
    upstream = cache.mirror_urls(config)[cache.PYPI_INDEX]
    trusted = " ".join(f"--trusted-host {shlex.quote(h)}" for h in config["pip_trusted_hosts"])
    pip_packages(name=f"Install devpi-server {DEVPI_VERSION}", packages=[f"devpi-server=={DEVPI_VERSION}"],
                 python=venv_python, extra_args=f"--index-url {shlex.quote(upstream)} {trusted}".strip())

    serverdir = f"{config['cache_dir']}/pypi"
    initialised = host.get_fact(File, path=f"{serverdir}/.nodeinfo") is not None
    server.shell(
        name=f"Initialise devpi-server's store in {serverdir} (random root password, root only)",
        # The password reaches devpi-init in its environment (readable by root only), never on a command line.
        commands=[f"umask 077; head -c 32 /dev/urandom | base64 > {DEVPI_PASSWORD}",
                  f"DEVPISERVER_ROOT_PASSWD=\"$(cat {DEVPI_PASSWORD})\" "
                  f"{DEVPI_VENV}/bin/devpi-init --serverdir {shlex.quote(serverdir)} --no-root-pypi",
                  f"chown -R {CACHE_USER}: {shlex.quote(serverdir)}"],
        _if=lambda: not initialised,
    )
    files.put(name="Upload devpi-server's log filter (client addresses, for cache-stats)", src=str(DEVPI_LOG_SOURCE),
              dest=cache.DEVPI_LOG_FILTER, mode="644")
    files.put(name="Configure devpi-server's log (client addresses, for cache-stats)",
              src=StringIO(cache.devpi_logging_config()), dest=cache.DEVPI_LOGGING, mode="644")
    command = cache.devpi_command(DEVPI_VENV, config, listen)
    # Restarted when any file it reads at start is newer than the running server (its log filter included).
    state = host.get_fact(facts.SystemdServiceState, unit=cache.DEVPI_SERVICE,
                          paths=[cache.DEVPI_UNIT, cache.DEVPI_LOG_FILTER, cache.DEVPI_LOGGING])
    unit = files.put(name="Install the devpi-server systemd unit", dest=cache.DEVPI_UNIT, mode="644",
                     src=StringIO(cache.devpi_unit(command, CACHE_USER, DEVPI_LOG, cache.devpi_environment())))
    systemd.daemon_reload(name="Make systemd read the devpi-server unit",
                          _if=lambda: state.reload or unit.did_change())
    systemd.service(name="Run devpi-server as a systemd service", service=cache.DEVPI_SERVICE,
                    running=True, enabled=True)
    systemd.service(name="Restart devpi-server for its new settings", service=cache.DEVPI_SERVICE,
                    restarted=True, _if=lambda: state.stale or unit.did_change())

    files.put(name="Upload the devpi mirror-index helper", src=str(MIRRORS_SOURCE), dest=MIRRORS_SCRIPT, mode="755")
    wanted = cache.mirror_urls(config)
    base = f"http://127.0.0.1:{config['cache_pip_port']}"
    found = host.get_fact(facts.DevpiMirrors, base=base, indexes=sorted([*wanted, cache.WHEEL_INDEX]))
    if {i: u for i, u in found.items() if i != cache.WHEEL_INDEX} != wanted:
        pairs = " ".join(shlex.quote(f"{index}={url}") for index, url in sorted(wanted.items()))
        server.shell(name=f"Point devpi's mirror indexes at {', '.join(sorted(set(wanted.values())))}",
                     commands=[f"{shlex.join([venv_python, MIRRORS_SCRIPT, base, DEVPI_PASSWORD])} {pairs}"])
    _wheel_index(venv_python, base, found.get(cache.WHEEL_INDEX))

    scratch = f"{config['cache_dir']}/warm-download"
    warm = cache.warm_commands(config, venv_python, base, VENV_TOOLS, scratch)
    stamp = "\n".join([*warm, *(f"{i}={u}" for i, u in sorted(wanted.items()))]) + "\n"
    if host.get_fact(FileContents, path=WARM_STAMP) != stamp.splitlines():
        server.shell(name=f"Fetch the fleet's pinned Python packages into the cache once (torch {config['torch_version']})",
                     commands=[f"rm -rf {shlex.quote(scratch)}", *warm, f"rm -rf {shlex.quote(scratch)}"])
        files.put(name="Record which packages the cache holds", src=StringIO(stamp), dest=WARM_STAMP, mode="644")


def _wheel_index(venv_python: str, base: str, found: str | None) -> None:
    """The private index built wheels are uploaded to (cache.WHEEL_INDEX: inherits nothing, keeps every file) and
    its upload user, whose random password stays in a root-only file here (a builder on another host gets a copy
    for its upload, see deploys/xformers.py)."""
    has_password = host.get_fact(File, path=cache.UPLOAD_PASSWORD) is not None
    password = server.shell(
        name="Make the upload password of the cache's wheel index (random, root only)",
        commands=[f"umask 077; head -c 32 /dev/urandom | base64 -w0 > {cache.UPLOAD_PASSWORD}"],
        _if=lambda: not has_password,
    )
    command = shlex.join([venv_python, MIRRORS_SCRIPT, base, DEVPI_PASSWORD, "--private", cache.WHEEL_INDEX,
                          cache.WHEEL_UPLOADER, cache.UPLOAD_PASSWORD])
    name = f"Create the private wheel index {cache.WHEEL_INDEX} and its upload user {cache.WHEEL_UPLOADER}"
    if found != cache.WHEEL_INDEX_STATE:
        server.shell(name=name, commands=[command])
    else:
        server.shell(name=name.replace("Create", "Give") + " the new password", commands=[command],
                     _if=password.did_change)


def _serve() -> None:
    """The cache host: both servers installed, configured, listening (upstream settings, not the cache's own)."""
    config = settings(through_cache=False)
    if not host.get_fact(facts.HasSystemd):  # both servers are systemd services; refused before any change
        wsl = (host.get_fact(facts.WslInfo) or {"is_wsl": False})["is_wsl"]
        refuse_host([cache.no_systemd_problem(host.name, wsl)])
        return
    if cache_only():
        # No preflight runs on a host that only serves the cache; its space is checked here, before any change.
        disk = free_disk(host, config["cache_dir"])
        need = DiskNeed(config["cache_dir"], disk["mount"], disk["free"], STAGE_DISK_GB["cache"], "the fleet cache")
        problems = disk_problems([need], config["min_free_disk_gb"])
        if problems:
            refuse_host(problems)
            return
    address = str(host.data.get("ssh_hostname", host.name))
    listen = cache.listen_addresses(config, address)
    _apt_cacher(config, listen)
    _devpi(config, listen)
    _warm_apt(config)


@deploy("Fleet cache")
def fleet_cache() -> None:
    if host.data.get("gpufleet_cache_server"):
        _serve()
    address = host.data.get("gpufleet_cache_address")
    if address:
        files.put(
            name=f"Send apt through the fleet cache at {address}",
            src=StringIO(cache.apt_proxy_dropin(settings(), address)),
            dest=cache.APT_DROPIN,
            mode="644",
        )
    elif host.get_fact(File, path=cache.APT_DROPIN):
        files.file(name="Send apt straight to its repositories (no fleet cache)", path=cache.APT_DROPIN,
                   present=False)


run_alone(__file__, fleet_cache, cache_only_hosts=True)
