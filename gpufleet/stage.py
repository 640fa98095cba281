"""What every stage shares: the host's settings, its profile from facts, refusal, and running a stage alone.

The order of a run, and why (deploys/full.py and run_alone follow it; deploys refer here):
- pyinfra runs one operation at a time across the fleet. An operation is known by the lines that called it (the
  deploy file's line, then the stage's, then any helper's), and operations run in the order of those lines, each
  on every host that planned it before the next one starts.
- So a deploy calls each stage on its own line: two stages called from one line would share their operations'
  places and collide.
- So an operation that one host must finish before another host's (the cache host's servers before any client
  downloads through them; the builder's wheel fetched before the other hosts upload it) is planned by every host,
  at the same line and in that order, and gated with _if to the hosts it concerns.
- Every run first takes the host lock (before any fact is read), then preflight refuses what cannot be provisioned
  before anything changes, then dpkg work a dropped connection interrupted is finished, then the stages run in the
  pipeline's order: cache, driver, cuda, python, torch, xformers, smoke. A refused host plans nothing further.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pyinfra import host, logger, state
from pyinfra.api.host import Host
from pyinfra.facts.files import Directory, File, FileContents, Link

from gpufleet import cache, facts, hostlock
from gpufleet.buildplan import INSTALLED_STAMP
from gpufleet.decide import STAGE_DISK_GB, DiskNeed, HostProfile, host_gpus
from gpufleet.fact_memo import ask_ahead, fact
from gpufleet.layout import cuda_home
from gpufleet.nvidia_repo import repair_interrupted_packages
from gpufleet.operations import refuse
from gpufleet.runstate import CACHE_ONLY, REFUSED, this_run
from gpufleet.settings import load_settings

_SETTINGS = load_settings()
_LOCAL_ADDRESSES = {"localhost", "127.0.0.1", "::1"}


def settings(target: Host | None = None, through_cache: bool = True) -> dict[str, Any]:
    """Every setting for a host (default: the current one): inventory and group_data values over all.py's defaults.

    With a fleet cache in the inventory the pip indexes are the cache's (gpufleet.cache.through_cache);
    `through_cache=False` gives the upstreams as configured, which the cache host itself mirrors.
    """
    target = host if target is None else target
    config = {name: target.data.get(name, s.default) for name, s in _SETTINGS.items()}
    if not through_cache:
        return config
    return cache.through_cache(config, target.data.get("gpufleet_cache_address"))


def is_control_machine(target: Host | None = None) -> bool:
    target = host if target is None else target
    if target.name.startswith("@local"):
        return True
    return str(target.data.get("ssh_hostname", target.name)) in _LOCAL_ADDRESSES


def profile(target: Host | None = None) -> HostProfile:
    """A host (default: the current one) as facts describe it."""
    host_ = host if target is None else target
    config = settings(host_)
    # One round trip for every probe below and what the stages read next (a host that could not be probed has
    # failed already).
    disk_paths = (config["work_dir"], config["venv_path"])
    ask_ahead(host_, [(facts.HostProbe, {"disk_paths": disk_paths}), *read_ahead(config)])
    probe = fact(host_, facts.HostProbe, disk_paths=disk_paths) or {"disks": []}
    wsl = probe.get("wsl") or {"is_wsl": False, "nvidia_smi": False}
    pci = probe.get("pci")
    smi = probe.get("smi") or facts.SmiResult(available=False)
    mem = probe.get("mem") or {"total": 0, "available": 0, "cpus": 1}
    disks = [d or {"free": 0, "mount": "?"} for d in probe["disks"]] or [{"free": 0, "mount": "?"}]
    # Both trees may share a filesystem; the smaller free space is what the install can count on.
    disk = min(disks, key=lambda d: d["free"])
    os_release = probe.get("os") or facts.OsRelease("unknown", "", "", "an unreadable OS")
    return HostProfile(
        name=host_.name,
        group=host_.data.get("gpufleet_group", "workstations"),
        os=os_release,
        is_wsl=wsl["is_wsl"],
        gpus=host_gpus(pci, smi),
        smi=smi,
        driver=probe.get("driver") or facts.DriverState(None, None),
        lspci_missing=pci is None,
        secure_boot=probe.get("secure_boot"),
        mem_total=mem["total"],
        mem_available=mem["available"],
        cpus=mem["cpus"],
        free_disk=disk["free"],
        disk_mount=disk["mount"],
        is_control_machine=is_control_machine(host_),
        missing_tools=tuple(probe.get("tools") or ()),
        build_account=fact(host_, facts.Account, user=config["build_user"]),
        disk_needs=disk_needs(host_, config, dict(zip(disk_paths, probe["disks"]))),
    )


def read_ahead(config: dict[str, Any]) -> list[tuple[type, dict[str, Any]]]:
    """What the stages read of every host, as root, that its settings alone decide: the build account, what the
    venv holds, the xformers stamp, the toolkit's nvcc and the owners of work_dir and venv_path (profile, cuda,
    python). Asked with HostProbe, they cost a no-op run no round trip of their own."""
    return [
        (facts.Account, {"user": config["build_user"]}),
        (facts.InstalledDistributions, {"python": f"{config['venv_path']}/bin/python"}),
        (FileContents, {"path": INSTALLED_STAMP}),
        (facts.NvccVersion, {"cuda_home": cuda_home(config)}),
        (Directory, {"path": config["work_dir"]}),
        (Directory, {"path": config["venv_path"]}),
    ]


def free_disk(target: Host, path: str) -> dict[str, Any]:
    return fact(target, facts.FreeDisk, path=path) or {"free": 0, "mount": "?"}


def disk_needs(target: Host, config: dict[str, Any], probed: dict[str, Any]) -> tuple[DiskNeed, ...]:
    """Where each stage still to do writes, and how much it needs there (decided from what the host already has).

    probed: the free space HostProbe already read, by path; other paths cost a round trip each.
    """
    python = f"{config['venv_path']}/bin/python"
    torch_done = (fact(target, facts.InstalledDistributions, python=python) or {}).get("torch") == config["torch_version"]
    xformers_done = file_text(INSTALLED_STAMP, target) is not None
    toolkit_done = config["cuda_existing_home"] is not None or (
        fact(target, facts.NvccVersion, cuda_home=cuda_home(config)) == config["cuda_version"]
    )
    wanted = [
        (config["work_dir"], "pip's cache and the xformers build",
         0 if torch_done and xformers_done else STAGE_DISK_GB["work_dir"]),
        (config["venv_path"], "torch and its CUDA libraries",
         0 if torch_done or config["venv_adopt"] else STAGE_DISK_GB["venv"]),
    ]
    if not toolkit_done:
        wanted.append(("/usr/local", f"the CUDA {config['cuda_version']} toolkit", STAGE_DISK_GB["toolkit"]))
    if target.data.get("gpufleet_cache_server"):
        wanted.append((config["cache_dir"], "the fleet cache", STAGE_DISK_GB["cache"]))
    needs = []
    for path, what, gb in wanted:
        disk = (probed[path] or {"free": 0, "mount": "?"}) if path in probed else free_disk(target, path)
        needs.append(DiskNeed(path=path, mount=disk["mount"], free=disk["free"], need_gb=gb, what=what))
    return tuple(needs)


def take_host_lock() -> None:
    """The first step of every deploy, before any fact is read: this run alone touches the host until it ends
    (gpufleet.hostlock); a host another run holds is refused, naming that run."""
    problem = hostlock.lock_host(state, host, settings()["lock_timeout"])
    if problem:
        refuse_host([problem])


def lock_control_folder(folder: Path) -> None:
    """This run alone writes the folder on this machine (wheel cache, reports) until it ends."""
    hostlock.lock_control_folder(folder, settings()["lock_timeout"])


def refuse_host(reasons: list[str]) -> None:
    """Stop this host with every reason, before anything on it changes; the other hosts go on."""
    this_run().stopped[host.name] = REFUSED
    refuse(reasons=reasons, name=f"Refuse {host.name}: {reasons[0]}")


def refuse_planted_links(paths: list[str], trees: list[str] = ()) -> bool:
    """Refuse this host when any of these paths in the build user's tree (or anything inside `trees`) is a
    symbolic link: gpufleet makes none there, and root must not follow one. True when refused."""
    links = host.get_fact(facts.PlantedLinks, paths=paths, trees=list(trees))
    if links:
        refuse_host([f"{link} is a symbolic link in the build user's tree; gpufleet never follows such a link as "
                     "root. Remove it (and check who made it), then run again." for link in links])
    return bool(links)


def refused() -> bool:
    return this_run().stopped.get(host.name) == REFUSED


def stopped() -> bool:
    """Later stages plan nothing for this host: it was refused, or it serves only the fleet cache."""
    return host.name in this_run().stopped


def cache_only() -> bool:
    """The host serves the fleet cache and is no workstation: it gets no GPU stack."""
    return host.data.get("gpufleet_group") == "cache"


def skip_remaining_stages() -> None:
    """Later stages plan nothing for this host, without an error (a cache-only host)."""
    this_run().stopped.setdefault(host.name, CACHE_ONLY)


def not_implemented(stage: str, issue: int) -> None:
    """A stage whose issue has not landed stops the host loudly instead of pretending to succeed."""
    refuse_host([f"stage '{stage}' is not implemented yet (issue #{issue}); the run stops here"])


def run_alone(module_file: str, *stages: Callable[[], None], cache_only_hosts: bool = False) -> None:
    """Run preflight then the stages when pyinfra was pointed at this deploy file itself, in the order of a run
    (this module's docstring). A host that only serves the fleet cache gets none of them (as in deploys/full.py),
    unless cache_only_hosts (the cache stage)."""
    current = state.current_deploy_filename
    if current is None or Path(current).resolve() != Path(module_file).resolve():
        return
    take_host_lock()
    if cache_only() and not cache_only_hosts:
        skip_remaining_stages()
        return
    first, *rest = stages
    if not refused():
        first()
    if not refused():
        repair_interrupted_packages()
    for stage in rest:
        if refused():
            return
        stage()


def record_stack_change(op: Any) -> None:
    """Remember an operation that changes what the smoke test proves (driver, reboot, torch, xformers)."""
    this_run().stack_changes.setdefault(host.name, []).append(op)


def stack_changed() -> Callable[[], bool]:
    """For _if=: true at execution time when any recorded operation of this host changed something."""
    ops = list(this_run().stack_changes.get(host.name, []))
    return lambda: any(op.did_change() for op in ops)


def warn_once(message: str) -> None:
    """Log a warning once per run, however many hosts reach it."""
    if this_run().first_time(f"warning: {message}"):
        logger.warning(message)


def as_user(user: str) -> dict[str, Any]:
    """Global arguments that run an operation as user (su from root; sudo first where the inventory says sudo)."""
    return {} if user == "root" else {"_su_user": user}


def file_text(path: str, target: Host | None = None, **arguments: Any) -> str | None:
    """A small file's text on a host (default: the current one), None when it does not exist; `arguments`: pyinfra's
    global arguments, e.g. as_user(...) to read it as that user."""
    lines = fact(host if target is None else target, FileContents, path=path, **arguments)
    return None if lines is None else "\n".join(lines).strip()


def path_owner(path: str, target: Host | None = None) -> str | None:
    """Who owns the directory, file or link at path on a host (default: the current one); None when there is none."""
    target = host if target is None else target
    # pyinfra's facts answer False for a path of another type: ask the next type.
    for kind in (Directory, File, Link):
        found = fact(target, kind, path=path)
        if found is None:
            return None
        if found:
            return found["user"]
    return None


def venv_owner(config: dict[str, Any]) -> str:
    """Who installs into the venv: the build user, or the owner of an adopted venv."""
    if config["venv_adopt"]:
        return path_owner(config["venv_path"]) or config["build_user"]
    return config["build_user"]
