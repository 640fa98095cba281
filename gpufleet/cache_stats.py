"""What the fleet cache's servers say they served: hits, misses and bytes, in all and per client address, read
from apt-cacher-ng's and devpi-server's logs on the cache host, and the disk each one's cache uses (`du`), for
`gpufleet cache-stats`. Pure functions, unit-tested on captured logs."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

# Where the servers log: apt-cacher-ng's own log, and devpi-server's output as deploys/cache.py redirects it.
ACNG_LOG = "/var/log/apt-cacher-ng/apt-cacher.log"
DEVPI_LOG_DIR = "/var/log/gpufleet-cache"
DEVPI_LOG = f"{DEVPI_LOG_DIR}/devpi.log"


@dataclass
class CacheStats:
    """What a cache server says it served: requests answered from its cache or fetched upstream, in bytes."""
    server: str
    hits: int = 0
    misses: int = 0
    bytes_served: int = 0
    bytes_fetched: int = 0
    # Bytes sent to each client address: apt-cacher-ng counts every file it sent, devpi-server package files
    # (simple pages are not in its log with a size).
    per_client: dict[str, int] = field(default_factory=dict)
    disk_bytes: int | None = None  # du of the server's cache directory; None when it could not be read

    @property
    def bytes_saved(self) -> int:
        return max(self.bytes_served - self.bytes_fetched, 0)


# apt-cacher-ng's transfer log: "time|O|bytes|client|path" for bytes sent to a client, "time|I|bytes|..." for
# bytes it fetched upstream; a miss is a path with both, a hit a path sent without an upstream fetch.
_ACNG_LINE = re.compile(r"^\d+\|([IO])\|(\d+)\|([^|]*)\|(.+)$")


def acng_stats(log_text: str) -> CacheStats:
    """Each upstream fetch ("I") makes the next send of that path ("O") a miss; every other send is a hit."""
    stats = CacheStats("apt-cacher-ng")
    pending: dict[str, int] = {}
    for line in log_text.splitlines():
        match = _ACNG_LINE.match(line.strip())
        if not match:
            continue
        kind, size, client, path = match.group(1), int(match.group(2)), match.group(3), match.group(4)
        if kind == "I":
            stats.bytes_fetched += size
            pending[path] = pending.get(path, 0) + 1
            continue
        stats.bytes_served += size
        client = client.removeprefix("::ffff:")  # an IPv4 client on a dual-stack socket
        stats.per_client[client] = stats.per_client.get(client, 0) + size
        if pending.get(path):
            stats.misses += 1
            pending[path] -= 1
        else:
            stats.hits += 1
    return stats


# " from <address>" is added by gpufleet's log filter (files/cache/gpufleet_devpi_log.py); older logs lack it.
_DEVPI_SERVED = re.compile(r"\] GET /(\S+/\+f/\S+?)(?: from (\S+))?$")
_DEVPI_FETCHED = re.compile(r"reading remote: .*, target (\S+/\+f/\S+)$")


def devpi_stats(log_text: str, file_sizes: dict[str, int]) -> CacheStats:
    """devpi's own log: every "GET /<index>/+f/<file>" is a file served; one with a "reading remote: ..., target
    <index>/+f/<file>" line is a miss (fetched upstream), the others are hits.

    `file_sizes` maps "<index>/+f/<file>" to the size of the cached file (devpi's serverdir/+files tree).
    """
    stats = CacheStats("devpi-server")
    served: list[tuple[str, str | None]] = []
    fetched: set[str] = set()
    for line in log_text.splitlines():
        line = line.rstrip()
        if match := _DEVPI_SERVED.search(line):
            served.append((match.group(1), match.group(2)))
        elif match := _DEVPI_FETCHED.search(line):
            fetched.add(match.group(1))
    for path, client in served:
        size = file_sizes.get(path, 0)
        stats.bytes_served += size
        if client:
            stats.per_client[client] = stats.per_client.get(client, 0) + size
        if path in fetched:
            stats.misses += 1
            stats.bytes_fetched += size
            fetched.discard(path)
        else:
            stats.hits += 1
    return stats


_SECTION = "=== gpufleet-cache-stats {} ==="


def stats_command(cache_dir: str) -> str:
    """Shell command for the cache host printing both servers' logs and the sizes of devpi's cached files."""
    return "; ".join([
        f"echo '{_SECTION.format('acng')}'", f"cat {ACNG_LOG} 2>/dev/null",
        f"echo '{_SECTION.format('devpi')}'", f"cat {DEVPI_LOG} 2>/dev/null",
        f"echo '{_SECTION.format('files')}'",
        f"find {shlex.quote(cache_dir + '/pypi/+files')} -type f -printf '%s %P\\n' 2>/dev/null",
        f"echo '{_SECTION.format('disk')}'",
        f"du -sb -- {shlex.quote(cache_dir + '/apt')} {shlex.quote(cache_dir + '/pypi')} 2>/dev/null",
        "true",
    ])


def parse_stats_output(text: str) -> list[CacheStats]:
    """The two servers' statistics from what stats_command printed."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^=== gpufleet-cache-stats (\w+) ===$", line)
        if match:
            current = match.group(1)
            sections[current] = []
        elif current:
            sections[current].append(line)
    sizes = {}
    for line in sections.get("files", []):
        size, _, path = line.partition(" ")
        if size.isdigit():
            sizes[path] = int(size)
    apt_stats = acng_stats("\n".join(sections.get("acng", [])))
    pip_stats = devpi_stats("\n".join(sections.get("devpi", [])), sizes)
    for line in sections.get("disk", []):  # du -sb: "<bytes>\t<dir>", the apt dir and devpi's serverdir
        size, _, path = line.partition("\t")
        if size.isdigit():
            if path.endswith("/apt"):
                apt_stats.disk_bytes = int(size)
            elif path.endswith("/pypi"):
                pip_stats.disk_bytes = int(size)
    return [apt_stats, pip_stats]


def _mb(value: int | None, width: int) -> str:
    return f"{'-' if value is None else f'{value / 1e6:.1f}':>{width}}"


def report_lines(stats: list[CacheStats]) -> list[str]:
    """The table `gpufleet cache-stats` prints (under 80 columns): per server, then MB sent per client."""
    lines = [f"{'server':<14} {'hits':>6} {'misses':>6} {'served MB':>10} {'fetched MB':>10} {'saved MB':>9} "
             f"{'disk MB':>9}"]
    for s in stats:
        lines.append(f"{s.server:<14} {s.hits:>6} {s.misses:>6} {_mb(s.bytes_served, 10)} "
                     f"{_mb(s.bytes_fetched, 10)} {_mb(s.bytes_saved, 9)} {_mb(s.disk_bytes, 9)}")
    clients = sorted({c for s in stats for c in s.per_client}, key=_address_key)
    if clients:
        lines += ["", f"{'MB sent to':<16}" + "".join(f" {s.server:>14}" for s in stats) + f" {'total':>10}"]
        for client in clients:
            values = [s.per_client.get(client, 0) for s in stats]
            lines.append(f"{client:<16}" + "".join(f" {_mb(v, 14)}" for v in values) + f" {_mb(sum(values), 10)}")
    return lines


def _address_key(address: str) -> tuple:
    parts = address.split(".")
    return (0, *map(int, parts)) if len(parts) == 4 and all(p.isdigit() for p in parts) else (1, address)
