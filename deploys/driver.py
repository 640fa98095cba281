"""Stage 1, driver: NVIDIA's driver with the open kernel modules, pinned to a branch and held.

WSL2 gets no driver (it lives on Windows): only Windows' nvidia-smi put on PATH.
Runs alone (after preflight): pyinfra inventory.py deploys/driver.py
"""

import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt, server, systemd

from deploys.preflight import preflight
from gpufleet import facts
from gpufleet.decide import (
    DRIVER_PACKAGE_PREFIXES,
    branch_change,
    busy_reasons,
    cuda_repo_dir,
    driver_packages,
    kernel_flavour,
    kernels_without_module,
    may_reboot,
    stale_driver_holds,
)
from gpufleet.nvidia_repo import apt_settings, ensure_repo, pin_driver_source
from gpufleet.operations import put_file, refuse
from gpufleet.rollout import REBOOT_PENDING
from gpufleet.stage import (
    profile,
    record_stack_change,
    refuse_host,
    run_alone,
    settings,
)

HOLD_COMMAND = (
    "dpkg-query -W -f='${Package} ${db:Status-Abbrev}\\n' "
    + " ".join(f"'{prefix}*'" for prefix in DRIVER_PACKAGE_PREFIXES)
    + " 2>/dev/null | awk '$2 ~ /^ii/ {print $1}' | xargs -r apt-mark hold"
)
UNATTENDED_BLACKLIST = """// gpufleet: the driver and CUDA change only when driver_branch / cuda_version do.
Unattended-Upgrade::Package-Blacklist {
    "nvidia-";
    "libnvidia-";
    "linux-modules-nvidia-";
    "cuda-";
};
"""
NOUVEAU_CONF = "/etc/modprobe.d/gpufleet-blacklist-nouveau.conf"
NOUVEAU_BLACKLIST = "# gpufleet: the NVIDIA driver needs nouveau out of the way.\nblacklist nouveau\noptions nouveau modeset=0\n"


@deploy("NVIDIA driver")
def driver() -> None:
    config = settings()
    me = profile()
    if me.is_wsl:
        _wsl_driver(me.smi)
        return
    if config["hold_driver_updates"]:
        put_file(
            name="Keep unattended-upgrades away from the driver and CUDA",
            src=StringIO(UNATTENDED_BLACKLIST),
            dest="/etc/apt/apt.conf.d/51gpufleet-driver-hold",
            mode="644",
        )
    if config["driver_accept_existing"]:
        _handle_mismatch(me, config, installed=None)
        return

    kernels = host.get_fact(facts.InstalledKernels)
    flavour = kernel_flavour(_running(kernels), kernels.metapackages)
    wanted = driver_packages(config["driver_source"], config["driver_branch"], config["driver_flavour"], flavour)
    if config["driver_source"] == "nvidia":
        ensure_repo(config, cuda_repo_dir(me.os, me.is_wsl))
    else:
        apt_settings(config)
        pin_driver_source(config)
        apt.update(name="Refresh apt lists for Ubuntu's driver packages", cache_time=3600)

    headers = host.get_fact(facts.KernelHeaders)
    apt.packages(
        name=f"Install kernel headers for DKMS (linux-headers-{headers['release']})",
        packages=[f"linux-headers-{headers['release']}"],
    )
    nouveau = put_file(
        name="Blacklist nouveau",
        src=StringIO(NOUVEAU_BLACKLIST),
        dest=NOUVEAU_CONF,
        mode="644",
    )
    initramfs_stale = host.get_fact(facts.InitramfsStale, conf=NOUVEAU_CONF)
    server.shell(
        name="Rebuild the initramfs without nouveau",
        commands=["if command -v update-initramfs >/dev/null; then update-initramfs -u; fi"],
        _if=lambda: initramfs_stale or nouveau.did_change(),
    )

    _refresh_lists_for_branch_change(me, wanted)
    held = set(host.get_fact(facts.HeldPackages))
    stale_holds = stale_driver_holds(me.driver.packages, held, config["driver_branch"])
    if stale_holds:
        server.shell(
            name=f"Release the holds of the previous driver ({', '.join(stale_holds)})",
            commands=[f"apt-mark unhold {shlex.join(stale_holds)}"],
        )
    install = apt.packages(
        name=f"Install the NVIDIA driver ({', '.join(wanted)})",
        packages=wanted,
        no_recommends=False,
    )
    record_stack_change(install)
    per_kernel = _module_for_every_kernel(config, kernels, flavour)
    unheld = [p for p in me.driver.packages if p.startswith(DRIVER_PACKAGE_PREFIXES) and p not in held]
    server.shell(
        name="Hold the NVIDIA driver packages",
        commands=[HOLD_COMMAND],
        _if=lambda: bool(unheld) or bool(stale_holds) or install.did_change()
        or any(op.did_change() for op in per_kernel),
    )
    # After the reboot (or the stop): the daemon cannot start against a stale or missing module.
    _handle_mismatch(me, config, installed=install)
    if host.get_fact(facts.HasSystemd):
        systemd.service(
            name="Enable the NVIDIA persistence daemon",
            service="nvidia-persistenced",
            enabled=True,
            running=True,
        )


def _running(kernels: facts.KernelState) -> str:
    return next(k.release for k in kernels.kernels if k.running)


def _module_for_every_kernel(config, kernels: facts.KernelState, flavour: str | None) -> list:
    """Every installed kernel gets its NVIDIA module before any reboot, so a reboot into a newer kernel never comes
    up without the driver: with DKMS (NVIDIA's repository) the flavour's headers metapackage (future kernels bring
    their headers), the headers of each installed kernel and `dkms autoinstall -k` where the module is missing; with
    Ubuntu's signed modules the module package of each such kernel. Planned from the kernels' state at the start of
    the run; nothing when every kernel has the driver_branch module."""
    branch = config["driver_branch"]
    missing = kernels_without_module(kernels.kernels, branch)
    suffix = "-open" if config["driver_flavour"] == "open" else ""
    if config["driver_source"] == "ubuntu":
        if not missing:
            return []
        packages = [f"linux-modules-nvidia-{branch}{suffix}-{release}" for release in missing]
        return [apt.packages(name=f"Install Ubuntu's signed NVIDIA modules for every kernel ({', '.join(packages)})",
                             packages=packages)]
    ops = []
    if flavour is not None:
        ops.append(apt.packages(name=f"Install the kernel headers metapackage (linux-headers-{flavour})",
                                packages=[f"linux-headers-{flavour}"]))
    no_headers = [k.release for k in kernels.kernels if not k.headers and not k.running]
    if no_headers:
        ops.append(apt.packages(name=f"Install the headers of every installed kernel ({', '.join(no_headers)})",
                                packages=[f"linux-headers-{release}" for release in no_headers]))
    for release in missing:
        ops.append(server.shell(name=f"Build the NVIDIA module for kernel {release} (dkms autoinstall)",
                                commands=[f"dkms autoinstall -k {shlex.quote(release)}"]))
    return ops


def _refresh_lists_for_branch_change(me, wanted: list[str]) -> None:
    """A branch change needs apt lists that know the new branch (published after the lists were last read); the
    step exists only while another branch's driver is installed and the wanted packages are not."""
    if branch_change(me.driver.packages, wanted):
        apt.update(name=f"Refresh apt lists for the new driver branch ({', '.join(wanted)})")


def _handle_mismatch(me, config, installed) -> None:
    """Reboot (or stop with instructions) when the driver was just installed, or, from the host's state, when the
    loaded module is stale or a module on disk was never loaded (a run killed between install and reboot)."""
    state = me.driver
    if state.mismatch:
        reason = (
            f"the loaded NVIDIA module is {state.loaded.version} but {state.on_disk_version} is installed "
            "(nvidia-smi: 'Driver/library version mismatch')"
        )
        needs = lambda: True  # noqa: E731
    elif state.loaded is None and state.on_disk_version is not None:
        reason = f"the NVIDIA module {state.on_disk_version} is installed but not loaded (the host was not rebooted)"
        needs = lambda: True  # noqa: E731
    elif installed is not None:
        reason = "the NVIDIA driver was installed or changed"
        needs = installed.did_change
    else:
        return
    if may_reboot(me, config) and _reboot_pending(reason, config, needs):
        return
    if may_reboot(me, config):
        record_stack_change(
            server.reboot(
                name=f"Reboot: {reason}",
                reboot_timeout=config["reboot_timeout"],
                _if=needs,
            )
        )
        return
    why = "reboot_policy is never" if config["reboot_policy"] == "never" else "this is the machine running pyinfra"
    refuse(
        name=f"Stop {host.name}: reboot needed",
        reasons=[
            f"{reason}; gpufleet does not reboot it ({why}). Reboot the host (or, when nothing uses the GPU, "
            "unload the modules: rmmod nvidia_uvm nvidia_drm nvidia_modeset nvidia), then run gpufleet again."
        ],
        _if=needs,
    )


def _reboot_pending(reason: str, config, needs) -> bool:
    """Stop a busy host instead of rebooting it (GPU compute processes, logged-in users), unless reboot_when_busy.

    Decided from the host's state when the run starts; returns whether the host was stopped."""
    busy = busy_reasons(host.get_fact(facts.GpuBusy), config)
    if not busy:
        return False
    refuse(
        name=f"Stop {host.name}: reboot pending",
        reasons=[
            f"{REBOOT_PENDING}: {reason}, but the host is busy ({'; '.join(busy)}); gpufleet does not reboot a busy "
            "host. Reboot it when they are done (or set reboot_when_busy: true), then run gpufleet again."
        ],
        _if=needs,
    )
    return True


def _wsl_driver(smi: facts.SmiResult) -> None:
    if smi.error:
        refuse_host(
            [
                f"Windows' nvidia-smi fails inside WSL ({smi.error}); update the NVIDIA driver on Windows and "
                "restart WSL (wsl --shutdown)."
            ]
        )
        return
    put_file(
        name="Put Windows' nvidia-smi on PATH",
        src=StringIO('# gpufleet: WSL2 reaches the Windows driver here.\nexport PATH="$PATH:/usr/lib/wsl/lib"\n'),
        dest="/etc/profile.d/gpufleet-wsl.sh",
        mode="644",
    )


run_alone(__file__, preflight, driver)
