"""Where the lab keeps things and which network it owns; one place so setup and teardown agree."""

import os
from pathlib import Path

# Several labs can run side by side (one per developer session): GPUFLEET_LAB_INSTANCE=N gives lab N its own
# state directory, bridge, namespaces and /24. The cache is shared.
INSTANCE = int(os.environ.get("GPUFLEET_LAB_INSTANCE", "0"))
_SUFFIX = str(INSTANCE) if INSTANCE else ""

# Built once and kept between runs: the Debian base, downloaded .debs, wheels and the xformers sdist.
CACHE_DIR = Path("/var/cache/gpufleet-lab")
# Everything one running lab owns: keys, host overlays, served mirror tree, pid files, inventories.
STATE_DIR = Path(f"/var/lib/gpufleet-lab{_SUFFIX}")

# A /24 chosen to be unlikely on real networks; `network.check_subnet_free` refuses to run if it is in use.
SUBNET_PREFIX = f"10.213.{47 + INSTANCE}"
BRIDGE_NAME = f"gflab{INSTANCE}"
BRIDGE_IP = f"{SUBNET_PREFIX}.1"
# Host n (1-based) gets .10+n, so up to 200 hosts fit.
HOST_IP_OFFSET = 10
NETNS_PREFIX = f"gflab{_SUFFIX}-"
# The cgroup (under this machine's cgroup2 root) holding the lab's systemd hosts, one child cgroup each.
CGROUP_NAME = f"gpufleet-lab{_SUFFIX}"
MIRROR_PORT = 8047
# The same mirror tree over https, with a certificate from the lab's own CA (tls.py) that every lab host trusts.
MIRROR_HTTPS_PORT = 8443

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"


def host_ip(index: int) -> str:
    return f"{SUBNET_PREFIX}.{HOST_IP_OFFSET + index}"


def mirror_base_url() -> str:
    return f"http://{BRIDGE_IP}:{MIRROR_PORT}"


def mirror_https_url() -> str:
    """The mirrors over https: the certificate names BRIDGE_IP, the address the hosts use."""
    return f"https://{BRIDGE_IP}:{MIRROR_HTTPS_PORT}"
