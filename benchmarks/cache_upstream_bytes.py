"""Bytes the upstream mirror sends while N lab hosts install the same packages, without and with the fleet cache.

A benchmark, not a test: it prints figures. Needs root; use GPUFLEET_LAB_INSTANCE to run beside other labs.
Each N gets fresh hosts; with the cache one more host serves it (apt-cacher-ng, devpi-server). The deploy is
tests/lab/deploys/cache_clients.py: deploys/cache.py, then a Debian package and the CUDA toolkit through apt,
ninja, wheel and torch through pip, and the xformers sdist.

Realistic sizes: the lab's stand-in `cuda-toolkit-12-8` .deb and `torch` wheel (same names and versions) are
replaced in its mirror by ones carrying --payload-mb MB of random, so incompressible, bytes each. They are built
once and kept under /var/cache/gpufleet-lab/bench-standins-<MB>mb (--payload-mb 0 keeps the lab's tiny ones).

Upstream bytes are the sizes of the files the lab mirror answered with 200 (its access log), split into package
files (.deb .whl .tar.gz) and index metadata (apt lists, simple pages). "of which setup" is the cache host
installing its own servers and fetching the deploys' packages once, before the workstations run; it is part of
the "with cache" total. The verdict: with the cache, the largest N's total must stay under 1.2x the smallest's
(exit 1 when it does not).
Usage: python benchmarks/cache_upstream_bytes.py [--sizes 1 3 6 12] [--payload-mb 300] [--quick]
"""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpufleet_lab import Lab, mirrors, prepare, standins
from gpufleet_lab.paths import CACHE_DIR
from gpufleet_lab.runner import REPO_ROOT, run_pyinfra

DEPLOY = REPO_ROOT / "tests/lab/deploys/cache_clients.py"
PACKAGE_FILES = (".deb", ".whl", ".tar.gz")
LIMIT = 1.2  # with the cache, the largest fleet's upstream total must stay under this times the smallest's

Bytes = tuple[int, int]  # (package file bytes, index metadata bytes)


def sized_standins(payload_mb: int) -> tuple[Path, Path]:
    """The toolkit .deb and torch wheel with `payload_mb` MB of random bytes each, built once into the lab cache."""
    target = CACHE_DIR / f"bench-standins-{payload_mb}mb"
    if not (target / ".complete").exists():
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        print(f"Building the {payload_mb} MB stand-ins once into {target} ...", flush=True)
        standins.cuda_toolkit_deb(staging, payload=os.urandom(payload_mb * 10**6))
        standins.torch_wheel(staging, payload=os.urandom(payload_mb * 10**6))
        (staging / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return next(target.glob("cuda-toolkit-*.deb")), next(target.glob("torch-*.whl"))


def use_sized_standins(lab: Lab, deb: Path, wheel: Path) -> None:
    """Put the sized packages in place of the lab's tiny ones (hard links: no copy) and re-sign / re-index."""
    for repo_dir in mirrors.CUDA_REPO_DIRS:
        repo = mirrors.cuda_repo(lab.www, repo_dir)
        (repo / deb.name).unlink()
        os.link(deb, repo / deb.name)
        mirrors.sign_flat_repo(repo, lab.keys)
    (lab.www / "packages" / wheel.name).unlink()
    # build_simple_index would also rewrite the root listing with torch alone: give it the whole set again.
    packages = sorted(p for p in (lab.www / "packages").iterdir() if p.is_file())
    os.link(wheel, lab.www / "packages" / wheel.name)
    mirrors.build_simple_index(lab.www, [*packages, wheel])


def upstream_bytes(lab: Lab, since: int) -> tuple[Bytes, int]:
    """((package file bytes, index bytes) the mirror sent since offset `since` of its log, the log's new length)."""
    text = (lab.state_dir / "mirror.log").read_text()
    requests = mirrors.access_log(text[since:])
    files = [r for r in requests if r[1].endswith(PACKAGE_FILES)]
    rest = [r for r in requests if not r[1].endswith(PACKAGE_FILES)]
    return (mirrors.served_bytes(lab.www, files), mirrors.served_bytes(lab.www, rest)), len(text)


def _add(a: Bytes, b: Bytes) -> Bytes:
    return a[0] + b[0], a[1] + b[1]


def measure(lab: Lab, size: int, with_cache: bool, workdir: Path) -> tuple[Bytes, Bytes]:
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


def _mb(value: Bytes) -> str:
    return f"{value[0] / 1e6:.1f} + {value[1] / 1e6:.2f}"


HEADER = (f"{'hosts':>5}  {'no cache':>17}  {'with cache':>17}  {'of which setup':>17}  {'x N=1':>6}\n"
          f"{'':>5}  {'files + index':>17}  {'files + index':>17}  {'files + index':>17}  {'(cache)':>6}")


def row(size: int, without: Bytes, with_cache: Bytes, setup: Bytes, first_total: int) -> str:
    ratio = sum(with_cache) / first_total if first_total else 0.0
    return f"{size:>5}  {_mb(without):>17}  {_mb(with_cache):>17}  {_mb(setup):>17}  {ratio:>6.3f}"


def verdict(rows: list[tuple[int, Bytes, Bytes, Bytes]]) -> tuple[bool, str]:
    """With the cache, is the largest fleet's upstream total under LIMIT times the smallest's?"""
    (small, _, small_total, _), (large, _, large_total, _) = rows[0], rows[-1]
    ratio = sum(large_total) / sum(small_total)
    ok = ratio < LIMIT
    return ok, (f"Verdict: with the cache, N={large} took {ratio:.3f}x the upstream bytes of N={small} "
                f"({'under' if ok else 'NOT under'} {LIMIT}x): {'PASS' if ok else 'FAIL'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 3, 6, 12])
    parser.add_argument("--payload-mb", type=int, default=300,
                        help="random MB in the toolkit .deb and in the torch wheel (0: the lab's tiny ones)")
    parser.add_argument("--quick", action="store_true", help="--sizes 1 2 --payload-mb 0: checks the benchmark runs")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.payload_mb = [1, 2], 0
    sizes = sorted(set(args.sizes))
    prepare()
    sized = sized_standins(args.payload_mb) if args.payload_mb > 0 else None
    lab = Lab()
    rows: list[tuple[int, Bytes, Bytes, Bytes]] = []
    try:
        lab.up(0)
        if sized:
            use_sized_standins(lab, *sized)
            print(f"Stand-ins: {sized[0].name} {sized[0].stat().st_size / 1e6:.1f} MB, "
                  f"{sized[1].name} {sized[1].stat().st_size / 1e6:.1f} MB", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            for size in sizes:
                without, _ = measure(lab, size, False, Path(tmp))
                with_cache, setup = measure(lab, size, True, Path(tmp))
                rows.append((size, without, with_cache, setup))
                print(f"N={size}: without {sum(without) / 1e6:.1f} MB, with cache {sum(with_cache) / 1e6:.1f} MB",
                      flush=True)
    finally:
        lab.down()
    if not rows:
        return 1
    print("\nUpstream MB the lab mirror served: package files (.deb .whl .tar.gz) + index")
    print("metadata (apt lists, simple pages); 'x N=1': with-cache total over N=1's.")
    print(HEADER)
    for size, without, with_cache, setup in rows:
        print(row(size, without, with_cache, setup, sum(rows[0][2])))
    ok, line = verdict(rows)
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
