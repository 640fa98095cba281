"""Running commands on the control machine, and installing the Debian tools the lab needs."""

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

# Tool -> Debian package that provides it; `ensure_tools` installs the missing ones (CI starts from a bare machine).
REQUIRED_TOOLS: dict[str, str] = {
    "mmdebstrap": "mmdebstrap",
    "dpkg-deb": "dpkg",
    "apt-ftparchive": "apt-utils",
    "gpg": "gnupg",
    "ssh-keygen": "openssh-client",
    "ssh": "openssh-client",
    "ip": "iproute2",
    "unshare": "util-linux",
    "setpriv": "util-linux",
    "lspci": "pciutils",
    "modinfo": "kmod",
    "depmod": "kmod",
    "openssl": "openssl",
}


class LabError(RuntimeError):
    """A lab step failed; the message says which and what to do."""


def run(cmd: Sequence[str], *, check: bool = True, input: str | None = None,
        capture: bool = True, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), input=input, text=True, env=env, cwd=cwd,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr or ''}{proc.stdout or ''}")
    return proc


def missing_tools() -> list[str]:
    return sorted({pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None})


def ensure_tools() -> None:
    """Install the Debian packages behind any missing lab tool (apt-get, this machine's own sources)."""
    packages = missing_tools()
    if not packages:
        return
    run(["apt-get", "update"], capture=False)
    run(["apt-get", "install", "-y", "--no-install-recommends", *packages], capture=False)
