"""First-run and no-op re-run wall times of the lab test deploy on 3, 6, 12 and 24 lab hosts.

A benchmark, not a test: it prints figures. Needs root; builds the lab cache on first use. The hosts are real
Debian 12 systems over SSH on this machine; the NVIDIA packages they install are stand-ins (gpufleet/lab).
Usage: python benchmarks/rerun.py [--sizes 3 6 12 24] [--deploy tests/lab/deploys/basic.py]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpufleet.lab import Lab, prepare
from gpufleet.lab.runner import REPO_ROOT, run_pyinfra


def measure(lab: Lab, size: int, deploy: Path, workdir: Path) -> tuple[float, float, float]:
    started = time.monotonic()
    hosts = lab.up(size)
    up_s = time.monotonic() - started
    names = [h.name for h in hosts]
    inventory = lab.write_inventory_py(workdir / f"inventory_{size}.py", hosts)
    started = time.monotonic()
    run_pyinfra(inventory, deploy).assert_converged(names)
    first = time.monotonic() - started
    started = time.monotonic()
    run_pyinfra(inventory, deploy).assert_no_changes(names)
    rerun = time.monotonic() - started
    return up_s, first, rerun


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 6, 12, 24])
    parser.add_argument("--deploy", type=Path, default=REPO_ROOT / "tests/lab/deploys/basic.py")
    args = parser.parse_args()
    prepare()
    lab = Lab()
    results: dict[int, tuple[float, float, float]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for size in args.sizes:
                results[size] = measure(lab, size, args.deploy, Path(tmp))
                up_s, first, rerun = results[size]
                print(f"{size:3d} hosts: lab up {up_s:6.1f} s   first run {first:6.1f} s   no-op re-run {rerun:6.1f} s",
                      flush=True)
    finally:
        lab.down()
    low, high = min(results), max(results)
    if high != low:
        print(f"ratio {high}/{low}: first run {results[high][1] / results[low][1]:.2f}x, "
              f"no-op re-run {results[high][2] / results[low][2]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
