"""The fleet's xformers plan: each host's wheel fingerprint, and which host builds each fingerprint.

Computed from every connected host's settings and facts, in inventory order, so every host's deploy code reaches
the same answer without talking to the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyinfra import state
from pyinfra.api.host import Host

from gpufleet.buildplan import INSTALLED_STAMP, arch_union, normalise_arch_list
from gpufleet.decide import arch_list, preflight_problems
from gpufleet.fingerprint import WheelInputs, fingerprint, read_patch_series
from gpufleet.settings import REPO_ROOT
from gpufleet.stage import file_text, profile, settings


@dataclass(frozen=True)
class HostWheel:
    host: str
    fingerprint: str
    arch_list: list[str]
    needs_install: bool
    # Preflight passes: the host can take part (and so can build).
    eligible: bool = True


def patch_dir(config: dict[str, Any]) -> Path:
    path = Path(config["xformers_patch_dir"])
    return path if path.is_absolute() else REPO_ROOT / path


def fleet_hosts() -> list[Host]:
    """Connected hosts in inventory order."""
    return [h for h in state.inventory if h in state.activated_hosts]


def _host_archs(h: Host) -> list[str]:
    return arch_list(profile(h).gpus)


def fleet_arch_list() -> list[str]:
    """The union of every connected host's GPU architectures."""
    return arch_union(_host_archs(h) for h in fleet_hosts())


def wheel_fingerprint(config: dict[str, Any], archs: list[str]) -> str:
    """The fingerprint of the wheel these settings build for these architectures."""
    return fingerprint(
        WheelInputs(
            xformers_version=config["xformers_version"],
            source_sha256=config["xformers_source_sha256"],
            patches=read_patch_series(patch_dir(config)),
            torch_version=config["torch_version"],
            cuda_version=config["cuda_version"],
            python_version=config["python_version"],
            arch_list=archs,
        )
    )


def host_wheel(h: Host) -> HostWheel:
    config = settings(h)
    archs = normalise_arch_list(config["xformers_arch_list"] or fleet_arch_list())
    fp = wheel_fingerprint(config, archs)
    # Root's stamp (buildplan.ROOT_STATE_DIR): the build user cannot forge it.
    installed = file_text(INSTALLED_STAMP, h)
    eligible = not preflight_problems(profile(h), config)
    return HostWheel(host=h.name, fingerprint=fp, arch_list=archs, needs_install=installed != fp, eligible=eligible)


def builder_for(fp: str, wheels: list[HostWheel], configured: str | None, preferred: str | None = None) -> str | None:
    """The host that builds fp: the configured builder when it shares fp and passes preflight; else `preferred`
    (the fleet cache host) on the same terms; else the first such host that needs the wheel."""
    sharing = [w for w in wheels if w.fingerprint == fp and w.eligible]
    for chosen in (configured, preferred):
        if chosen and any(w.host == chosen for w in sharing):
            return chosen
    return next((w.host for w in sharing if w.needs_install), None)


def cache_host() -> Host | None:
    """The fleet cache host (inventory group `cache`) when it is connected in this run."""
    return next((h for h in fleet_hosts() if h.data.get("gpufleet_cache_server")), None)


def fleet_wheels() -> list[HostWheel]:
    return [host_wheel(h) for h in fleet_hosts()]
