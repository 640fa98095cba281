"""The lab network: one bridge on a private /24 with the mirrors on .1, one network namespace per host.

Hosts get an address and nothing else: no default route, so anything outside the /24 answers
"Network is unreachable". Nothing here touches any interface or route the lab did not create.
"""

import ipaddress
import json

from gpufleet_lab.paths import (
    BRIDGE_IP,
    BRIDGE_NAME,
    INSTANCE,
    NETNS_PREFIX,
    SUBNET_PREFIX,
)
from gpufleet_lab.system import LabError, run

SUBNET = ipaddress.ip_network(f"{SUBNET_PREFIX}.0/24")


def check_subnet_free() -> None:
    """Refuse to build the lab when any interface other than the lab bridge already uses its /24."""
    for link in json.loads(run(["ip", "-j", "-4", "addr"]).stdout):
        for addr in link.get("addr_info", []):
            network = ipaddress.ip_interface(f"{addr['local']}/{addr['prefixlen']}").network
            if link["ifname"] != BRIDGE_NAME and network.overlaps(SUBNET):
                raise LabError(f"{link['ifname']} already uses {addr['local']}/{addr['prefixlen']}, which overlaps "
                               f"the lab network {SUBNET}; change SUBNET_PREFIX in gpufleet_lab/paths.py")


def bridge_exists() -> bool:
    return run(["ip", "link", "show", BRIDGE_NAME], check=False).returncode == 0


def create_bridge() -> None:
    check_subnet_free()
    run(["ip", "link", "add", BRIDGE_NAME, "type", "bridge"])
    run(["ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE_NAME])
    run(["ip", "link", "set", BRIDGE_NAME, "up"])


def delete_bridge() -> None:
    if bridge_exists():
        run(["ip", "link", "del", BRIDGE_NAME])


def netns_name(host: str) -> str:
    return f"{NETNS_PREFIX}{host}"


def lab_namespaces() -> list[str]:
    listing = run(["ip", "-j", "netns", "list"], check=False).stdout.strip()
    return [ns["name"] for ns in json.loads(listing or "[]") if ns["name"].startswith(NETNS_PREFIX)]


VETH_PREFIX = f"gfv{INSTANCE}-"


def veth_name(host: str) -> str:
    return f"{VETH_PREFIX}{host}"[:15]  # interface names are limited to 15 characters


def delete_stray_veths() -> None:
    """Delete lab veths whose namespace is gone but still pinned (e.g. by orphaned TCP sockets of a killed host)."""
    for link in json.loads(run(["ip", "-j", "link", "show", "type", "veth"]).stdout or "[]"):
        if link["ifname"].startswith(VETH_PREFIX):
            run(["ip", "link", "del", link["ifname"]], check=False)


def create_host_netns(host: str, ip: str) -> str:
    ns = netns_name(host)
    # A removed host with the same address may still be cached with its old MAC; forget it.
    run(["ip", "neigh", "flush", "to", ip, "dev", BRIDGE_NAME], check=False)
    run(["ip", "link", "del", veth_name(host)], check=False)  # left by a host whose namespace outlived it
    run(["ip", "netns", "add", ns])
    run(["ip", "link", "add", veth_name(host), "type", "veth", "peer", "name", "eth0", "netns", ns])
    run(["ip", "link", "set", veth_name(host), "master", BRIDGE_NAME, "up"])
    run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    return ns


def netns_pids(ns: str) -> list[int]:
    out = run(["ip", "netns", "pids", ns], check=False).stdout
    return [int(p) for p in out.split()]


def delete_netns(ns: str) -> None:
    run(["ip", "netns", "del", ns], check=False)
