"""The Debian 12 base every test host overlays: built once with mmdebstrap, cached by a hash of its recipe."""

import hashlib
import json
import shutil
from pathlib import Path

from gpufleet_lab.paths import (
    CACHE_DIR,
    DEBIAN_MIRROR,
    DEBIAN_SECURITY_MIRROR,
    DEBIAN_SUITE,
)
from gpufleet_lab.system import run

# What a fresh workstation has before gpufleet touches it, plus what pyinfra and the facts need to run.
BASE_PACKAGES: tuple[str, ...] = (
    "python3", "python3-venv", "openssh-server", "sudo", "ca-certificates", "gnupg",
    "kmod", "pciutils", "procps", "iproute2", "curl", "apt-utils", "less",
    # For hosts that boot systemd as PID 1 (hosts.py, systemd=True); inert on the others.
    "systemd", "systemd-sysv", "dbus",
)

SUDO_USER = "labadmin"

# Hooks: no host keys, no source that could reach the real archive, no services starting; one sudo admin.
CUSTOMIZE: tuple[str, ...] = (
    'rm -f "$1"/etc/ssh/ssh_host_*',
    'rm -f "$1"/etc/apt/sources.list "$1"/etc/apt/sources.list.d/*',
    'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/archives/*.deb',
    'printf "#!/bin/sh\\nexit 101\\n" > "$1"/usr/sbin/policy-rc.d && chmod 755 "$1"/usr/sbin/policy-rc.d',
    # An admin with passwordless sudo, for inventories with `sudo: true`; "*" (not "!") so sshd lets keys in.
    f'chroot "$1" useradd --create-home --shell /bin/bash --groups sudo --password "*" {SUDO_USER}',
    f'echo "{SUDO_USER} ALL=(ALL) NOPASSWD:ALL" > "$1"/etc/sudoers.d/{SUDO_USER} && chmod 440 "$1"/etc/sudoers.d/{SUDO_USER}',
)


def recipe() -> dict[str, object]:
    return {
        "suite": DEBIAN_SUITE,
        "variant": "minbase",
        "packages": list(BASE_PACKAGES),
        "mirrors": [f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE} main",
                    f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE}-updates main",
                    f"deb {DEBIAN_SECURITY_MIRROR} {DEBIAN_SUITE}-security main"],
        "customize": list(CUSTOMIZE),
    }


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:16]


def base_dir() -> Path:
    return CACHE_DIR / f"rootfs-{recipe_hash()}"


def ensure_base() -> Path:
    """Return the cached base, building it first when this recipe has none (a few minutes, once)."""
    target = base_dir()
    if (target / ".complete").exists():
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    spec = recipe()
    cmd = ["mmdebstrap", "--mode=root", "--variant=minbase", "--format=directory",
           f"--include={','.join(BASE_PACKAGES)}"]
    cmd += [f"--customize-hook={hook}" for hook in CUSTOMIZE]
    cmd += [str(spec["suite"]), str(staging), *[str(m) for m in spec["mirrors"]]]  # type: ignore[union-attr]
    run(cmd, capture=False)
    (staging / ".complete").write_text(json.dumps(spec, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target
