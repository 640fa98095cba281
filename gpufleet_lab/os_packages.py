"""The Debian 12 packages the deploys (and the lab's own test deploys) install: the OS mirror serves exactly
these and their dependencies. Add a package here when a deploy starts installing it."""

OS_PACKAGES: tuple[str, ...] = (
    # toolchain and sources for the xformers build
    "build-essential", "git", "ccache", "patch", "python3-dev", "python3-venv", "python3-pip",
    # what preflight and the driver stage read or need
    "pciutils", "kmod", "mokutil", "unattended-upgrades", "ca-certificates", "gnupg", "curl", "sudo",
    # the fleet cache host's apt proxy (deploys/cache.py)
    "apt-cacher-ng",
    # the lab's own test deploy
    "tree",
)
