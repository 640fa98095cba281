"""Bytes the upstream mirror sends while N lab hosts install the same packages, without and with the fleet cache.

A benchmark, not a test: it prints figures. Needs root; use GPUFLEET_LAB_INSTANCE to run beside other labs.
Each N gets fresh hosts; with the cache one more host serves it (apt-cacher-ng, devpi-server). The deploy is
tests/lab/deploys/cache_clients.py: deploys/cache.py, then a Debian package through apt and ninja, wheel and the
stand-in torch wheel through pip. Upstream bytes are the sizes of the files the lab mirror answered with 200
(its access log). "of which cache setup" is the cache host installing its own servers and fetching the pinned
wheels once, before the workstations run.
Usage: python benchmarks/cache_upstream_bytes.py [--sizes 1 3 6]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpufleet_lab import Lab, mirrors, prepare
from gpufleet_lab.runner import REPO_ROOT, run_pyinfra

DEPLOY = REPO_ROOT / "tests/lab/deploys/cache_clients.py"


PACKAGE_FILES = (".deb", ".whl", ".tar.gz")


def upstream_bytes(lab: Lab, since: int) -> tuple[tuple[int, int], int]:
    """((package file bytes, index bytes) the mirror sent since offset `since` of its log, the log's new length)."""
    text = (lab.state_dir / "mirror.log").read_text()
    requests = mirrors.access_log(text[since:])
    files = [r for r in requests if r[1].endswith(PACKAGE_FILES)]
    rest = [r for r in requests if not r[1].endswith(PACKAGE_FILES)]
    return (mirrors.served_bytes(lab.www, files), mirrors.served_bytes(lab.www, rest)), len(text)


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] + b[0], a[1] + b[1]


def measure(lab: Lab, size: int, with_cache: bool, workdir: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """Upstream (package, index) bytes in all, and of that the cache host's own setup, for `size` workstations."""
    for host in lab.hosts():
        lab.remove_host(host)
    clients = lab.add_hosts(size)
    path = workdir / f"inventory-{size}-{with_cache}.yaml"
    _, offset = upstream_bytes(lab, 0)
    if not with_cache:
        lab.write_inventory_yaml(path, clients)
        run_pyinfra(path, DEPLOY).assert_converged([h.name for h in clients])
        return upstream_bytes(lab, offset)[0], (0, 0)
    cache_host = lab.add_host(gpu="none", systemd=True)  # the cache runs only as systemd services
    lab.write_inventory_yaml(path, [cache_host, *clients])
    document = yaml.safe_load(path.read_text())
    entry = document["groups"]["workstations"]["hosts"].pop(cache_host.name)
    document["groups"]["cache"] = {"hosts": {cache_host.name: entry}}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    run_pyinfra(path, DEPLOY, "--limit", cache_host.name).assert_converged([cache_host.name])
    setup, after_setup = upstream_bytes(lab, offset)
    run_pyinfra(path, DEPLOY).assert_converged([cache_host.name, *(h.name for h in clients)])
    return _add(setup, upstream_bytes(lab, after_setup)[0]), setup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 3, 6])
    args = parser.parse_args()
    prepare()
    lab = Lab()
    rows = []
    try:
        lab.up(0)
        with tempfile.TemporaryDirectory() as tmp:
            for size in args.sizes:
                without, _ = measure(lab, size, False, Path(tmp))
                with_cache, setup = measure(lab, size, True, Path(tmp))
                rows.append((size, without, with_cache, setup))
                print(f"N={size}: without {sum(without) / 1e6:.2f} MB, with cache {sum(with_cache) / 1e6:.2f} MB",
                      flush=True)
    finally:
        lab.down()
    print("\nUpstream MB: package files (.deb .whl .tar.gz) + index metadata (apt lists, simple pages)")
    print(f"{'hosts':>5} {'no cache':>16} {'with cache':>16} {'cache setup':>16} {'cache, workstations':>20}")
    for size, without, with_cache, setup in rows:
        clients = (with_cache[0] - setup[0], with_cache[1] - setup[1])
        cells = [f"{a / 1e6:.2f} + {b / 1e6:.2f}" for a, b in (without, with_cache, setup, clients)]
        print(f"{size:>5} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16} {cells[3]:>20}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
