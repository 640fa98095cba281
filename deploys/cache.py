"""The optional fleet download cache (inventory group `cache`): apt-cacher-ng and devpi-server on the cache host,
apt on every host pointed at it. pip follows through the settings (gpufleet.cache.through_cache), so the venv's
pip.conf and the torch install use the cache's indexes; without a cache host nothing here changes a host except
removing an earlier proxy drop-in.

Runs alone: pyinfra inventory.py deploys/cache.py (in deploys/full.py it runs first, before any apt use).
Where systemd is PID 1 both servers are systemd services; without it (containers, the test lab) they are started
by apt-cacher-ng's init script and as a detached process, and started again by the next run when found down.
"""

import shlex
from io import StringIO
from pathlib import Path

from pyinfra import host, inventory
from pyinfra.api import Host, deploy
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
DEVPI_ARGS = f"{SECRETS_DIR}/devpi-command"
RUN_DIR = "/run/gpufleet-cache"
DEVPI_PID = f"{RUN_DIR}/devpi.pid"
WARM_STAMP = f"{SECRETS_DIR}/warmed"
APT_WARM_STAMP = f"{SECRETS_DIR}/warmed-apt"
MIRRORS_SCRIPT = "/usr/local/lib/gpufleet/devpi_mirrors.py"
MIRRORS_SOURCE = Path(__file__).resolve().parents[1] / "files" / "cache" / "devpi_mirrors.py"
DEVPI_LOG_SOURCE = Path(__file__).resolve().parents[1] / "files" / "cache" / "gpufleet_devpi_log.py"


def _apt_cacher(config: dict, listen: list[str], systemd_host: bool, listening: set[int]) -> None:
    apt_settings(config)
    # Only before the first install: later runs go through this host's own proxy, which may be the one down.
    if host.get_fact(File, path="/usr/sbin/apt-cacher-ng") is None:
        apt.update(name="Refresh apt lists for the cache servers", cache_time=3600)
    apt.packages(name="Install apt-cacher-ng, Python's venv module and curl",
                 packages=["apt-cacher-ng", "python3-venv", "curl"])
    files.directory(name=f"Create the apt cache {config['cache_dir']}/apt", path=f"{config['cache_dir']}/apt",
                    user="apt-cacher-ng", group="apt-cacher-ng", mode="755")
    conf = files.put(
        name="Configure apt-cacher-ng (cache_dir, cache_listen, cache_apt_port)",
        src=StringIO(cache.acng_config(config, listen)),
        dest=cache.ACNG_CONF,
        mode="644",
    )
    if systemd_host:
        systemd.service(name="Run apt-cacher-ng as a systemd service", service="apt-cacher-ng.service",
                        running=True, enabled=True)
        systemd.service(name="Restart apt-cacher-ng for its new settings", service="apt-cacher-ng.service",
                        restarted=True, _if=conf.did_change)
        return
    # No systemd (a container, the test lab): the package's own init script starts the daemon.
    if config["cache_apt_port"] not in listening:
        server.shell(name="Start apt-cacher-ng (no systemd here: its init script)",
                     commands=["/etc/init.d/apt-cacher-ng start"])
    else:
        server.shell(name="Restart apt-cacher-ng for its new settings (its init script)",
                     commands=["/etc/init.d/apt-cacher-ng restart"], _if=conf.did_change)


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


def _devpi(config: dict, listen: list[str], systemd_host: bool, listening: set[int]) -> None:
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
    logged = f"exec {shlex.join(command)} >> {DEVPI_LOG} 2>&1"
    if systemd_host:
        unit = files.put(name="Install the devpi-server systemd unit", dest=cache.DEVPI_UNIT, mode="644",
                         src=StringIO(cache.devpi_unit(["/bin/sh", "-c", shlex.quote(logged)], CACHE_USER)))
        systemd.service(name="Run devpi-server as a systemd service", service="gpufleet-devpi.service",
                        running=True, enabled=True, daemon_reload=unit.did_change)
        systemd.service(name="Restart devpi-server for its new settings", service="gpufleet-devpi.service",
                        restarted=True, _if=unit.did_change)
    else:
        args = files.put(name="Record devpi-server's command line", src=StringIO(shlex.join(command) + "\n"),
                         dest=DEVPI_ARGS, mode="600")
        start = (f"mkdir -p {RUN_DIR} && chown {CACHE_USER}: {RUN_DIR} && "
                 f"setsid -f runuser -u {CACHE_USER} -- sh -c {shlex.quote(f'echo $$ > {DEVPI_PID}; {logged}')} "
                 "< /dev/null > /dev/null 2>&1")
        if config["cache_pip_port"] not in listening:
            server.shell(name="Start devpi-server (no systemd here: a detached process)", commands=[start])
        else:
            server.shell(name="Restart devpi-server for its new settings",
                         commands=[f"kill $(cat {DEVPI_PID}) && sleep 1", start], _if=args.did_change)

    files.put(name="Upload the devpi mirror-index helper", src=str(MIRRORS_SOURCE), dest=MIRRORS_SCRIPT, mode="755")
    wanted = cache.mirror_urls(config)
    base = f"http://127.0.0.1:{config['cache_pip_port']}"
    found = host.get_fact(facts.DevpiMirrors, base=base, indexes=sorted(wanted))
    if found != wanted:
        pairs = " ".join(shlex.quote(f"{index}={url}") for index, url in sorted(wanted.items()))
        server.shell(name=f"Point devpi's mirror indexes at {', '.join(sorted(set(wanted.values())))}",
                     commands=[f"{shlex.join([venv_python, MIRRORS_SCRIPT, base, DEVPI_PASSWORD])} {pairs}"])

    scratch = f"{config['cache_dir']}/warm-download"
    warm = cache.warm_commands(config, venv_python, base, VENV_TOOLS, scratch)
    stamp = "\n".join([*warm, *(f"{i}={u}" for i, u in sorted(wanted.items()))]) + "\n"
    if host.get_fact(FileContents, path=WARM_STAMP) != stamp.splitlines():
        server.shell(name=f"Fetch the fleet's pinned Python packages into the cache once (torch {config['torch_version']})",
                     commands=[f"rm -rf {shlex.quote(scratch)}", *warm, f"rm -rf {shlex.quote(scratch)}"])
        files.put(name="Record which packages the cache holds", src=StringIO(stamp), dest=WARM_STAMP, mode="644")


def _serve() -> None:
    """The cache host: both servers installed, configured, listening (upstream settings, not the cache's own)."""
    config = settings(through_cache=False)
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
    systemd_host = host.get_fact(facts.HasSystemd)
    listening = host.get_fact(facts.ListeningPorts)
    _apt_cacher(config, listen, systemd_host, listening)
    _devpi(config, listen, systemd_host, listening)
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


run_alone(__file__, fleet_cache)
