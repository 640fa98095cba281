"""Re-run speed of the real stages, preflight..xformers, on 3, 6, 12 and 24 lab build-env hosts.

A benchmark, not a test: it prints figures. Needs root and the prepared lab cache. Each host is a real Debian 12
system over SSH on this machine with this machine's CUDA 13.0 toolkit and a real torch venv (gpufleet_lab/buildenv.py);
the GPU and its driver are stand-ins. The xformers wheel comes from a copy of the CI build cache
(/var/cache/gpufleet-build/xformers) when its fingerprint matches, so the first run installs it instead of
compiling for minutes; the table says when a run built it.

For each size: the first run on fresh hosts, the converging runs until one changes nothing (normally the first
run alone), then 3 no-op runs (their median), the controller's CPU seconds of the no-op (user + system of the
pyinfra process), and the commands plus file transfers pyinfra sent to each host in a no-op
(benchmarks/pyinfra_counted.py counts them). --profile prints the 10 slowest facts and operations of a no-op,
summed over hosts.

With --inventory the same figures come from real hosts instead of the lab (a GPU host: the full deploy, smoke test
included): one converging run, then the 3 no-op runs.

Usage: GPUFLEET_LAB_INSTANCE=K python benchmarks/rerun.py [--sizes 3 6 12 24] [--profile]
       python benchmarks/rerun.py --inventory inventory/examples/preprovisioned.yaml --deploy deploys/full.py --profile
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpufleet_lab import Lab, prepare
from gpufleet_lab.runner import REPO_ROOT, PyinfraRun, parse

DEPLOY = REPO_ROOT / "tests" / "lab" / "deploys" / "stages_to_xformers.py"
COUNTED = REPO_ROOT / "benchmarks" / "pyinfra_counted.py"
CI_WHEELS = Path(os.environ.get("GPUFLEET_BUILD_CACHE", "/var/cache/gpufleet-build")) / "xformers"
LOADED_DRIVER = "580.95.05"


@dataclass
class Timed:
    run: PyinfraRun
    wall: float
    cpu: float
    stats: dict = field(default_factory=dict)


def run_counted(inventory: Path, workdir: Path, deploy: Path = DEPLOY) -> Timed:
    """The real pyinfra CLI (through the counting wrapper) on the YAML inventory, timed."""
    stats = workdir / "stats.json"
    env = {**os.environ, "GPUFLEET_INVENTORY": str(inventory), "GPUFLEET_PYINFRA_STATS": str(stats),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(COUNTED), "-y", "--json", "inventory.py", str(deploy)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=3600, check=False)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timed(parse(command, proc), wall, cpu, json.loads(stats.read_text()) if stats.exists() else {})


def write_inventory(lab: Lab, hosts: list, path: Path, wheel_cache: Path) -> Path:
    lab.write_inventory_yaml(path, hosts)
    document = yaml.safe_load(path.read_text())
    document["settings"].update({**lab.build_settings(), "xformers_arch_list": ["12.0"], "reboot_policy": "never",
                                 "min_free_disk_gb": 10, "wheel_cache_dir": str(wheel_cache)})
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def built(run: PyinfraRun) -> bool:
    return any(op.split(" | ")[-1].startswith("Build xformers") for name in run.hosts for op in run.changes(name))


def measure(lab: Lab, size: int, workdir: Path, wheel_cache: Path) -> dict:
    for old in lab.hosts():
        lab.remove_host(old)
    hosts = lab.add_hosts(size, build_env=True)
    for h in hosts:
        lab.set_loaded_driver(h, LOADED_DRIVER)
    names = [h.name for h in hosts]
    inventory = write_inventory(lab, hosts, workdir / f"inventory-{size}.yaml", wheel_cache)
    first = run_counted(inventory, workdir)
    first.run.assert_converged(names)
    # Converge: the runs that still changed something (normally the first alone), up to the one that changed nothing.
    converge_runs, converge_s, last = 1, first.wall, first
    while any(last.run.changes(n) for n in names):
        if converge_runs == 4:
            raise SystemExit(f"{size} hosts still change after 4 runs: "
                             f"{ {n: last.run.changes(n) for n in names if last.run.changes(n)} }")
        last = run_counted(inventory, workdir)
        last.run.assert_converged(names)
        if any(last.run.changes(n) for n in names):
            converge_runs += 1
            converge_s += last.wall
    noops = [run_counted(inventory, workdir) for _ in range(3)]
    for noop in noops:
        noop.run.assert_no_changes(names)
    middle = sorted(noops, key=lambda t: t.wall)[1]
    per_host = [middle.stats["commands"].get(n, 0) for n in names]
    return {"size": size, "first": first.wall, "built": built(first.run), "converge_runs": converge_runs,
            "converge": converge_s, "noop": statistics.median(t.wall for t in noops),
            "noops": [t.wall for t in noops], "cpu": middle.cpu, "ssh": (min(per_host), max(per_host)),
            "stats": middle.stats, "load": os.getloadavg()}


def measure_inventory(inventory: Path, deploy: Path, workdir: Path) -> dict:
    """Real hosts as they are: one run to converge, then 3 no-op runs."""
    first = run_counted(inventory.resolve(), workdir, deploy.resolve())
    names = sorted(first.run.hosts)
    first.run.assert_converged(names)
    noops = [run_counted(inventory.resolve(), workdir, deploy.resolve()) for _ in range(3)]
    for noop in noops:
        noop.run.assert_no_changes(names)
    middle = sorted(noops, key=lambda t: t.wall)[1]
    per_host = [middle.stats["commands"].get(n, 0) for n in names]
    return {"size": len(names), "first": first.wall, "built": built(first.run), "converge_runs": 1,
            "converge": first.wall, "noop": statistics.median(t.wall for t in noops), "noops": [t.wall for t in noops],
            "cpu": middle.cpu, "ssh": (min(per_host), max(per_host)), "stats": middle.stats, "load": os.getloadavg()}


def print_row(r: dict, profile: bool) -> None:
    low, high = r["ssh"]
    runs = " ".join(f"{t:.1f}" for t in r["noops"])
    mark = "*" if r["built"] else " "
    print(f"{r['size']:5d} {r['first']:6.1f}s{mark} {r['converge']:6.1f}s/{r['converge_runs']} run"
          f" {r['noop']:6.2f}s ({runs:>14}) {r['cpu']:5.2f}s {low:4d}-{high:<4d}"
          f"  {' '.join(f'{x:.2f}' for x in r['load'])}", flush=True)
    if profile:
        print_profile(r)


def seed_wheel_cache(target: Path) -> None:
    if CI_WHEELS.is_dir():
        for fp in CI_WHEELS.iterdir():
            if (fp / "manifest.json").is_file():
                shutil.copytree(fp, target / fp.name)


def print_profile(result: dict) -> None:
    seconds, calls = result["stats"]["seconds"], result["stats"]["calls"]
    for kind in ("fact", "op"):
        top = sorted((k for k in seconds if k.startswith(kind + " ")), key=lambda k: -seconds[k])[:10]
        print(f"  10 slowest {'facts' if kind == 'fact' else 'operations'} of the no-op (summed over hosts):")
        for key in top:
            print(f"    {seconds[key]:6.2f} s {calls[key]:4d}x  {key.split(' ', 1)[1][:56]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 6, 12, 24])
    parser.add_argument("--profile", action="store_true", help="print the 10 slowest facts and operations")
    parser.add_argument("--inventory", type=Path, help="measure these real hosts instead of lab hosts")
    parser.add_argument("--deploy", type=Path, default=DEPLOY, help="with --inventory: the deploy to run")
    args = parser.parse_args()
    header = (f"{'hosts':>5} {'first':>7} {'converge':>12} {'no-op median (3 runs)':>27} {'CPU':>6} {'cmds/host':>9}"
              "  load avg (1/5/15 min)")
    if args.inventory:
        print(header)
        with tempfile.TemporaryDirectory() as tmp:
            print_row(measure_inventory(args.inventory, args.deploy, Path(tmp)), args.profile)
        return 0
    prepare()
    lab = Lab()
    lab.up(0)
    results = []
    print(header)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            seed_wheel_cache(workdir / "wheel-cache")
            for size in args.sizes:
                r = measure(lab, size, workdir, workdir / "wheel-cache")
                results.append(r)
                print_row(r, args.profile)
    finally:
        lab.down()
    if any(r["built"] for r in results):
        print("* this first run compiled xformers (no cached wheel for its fingerprint)")
    if len(results) > 1:
        low, high = results[0], results[-1]
        print(f"{high['size']} vs {low['size']} hosts: no-op {high['noop'] / low['noop']:.2f}x, controller CPU per "
              f"added host {(high['cpu'] - low['cpu']) / (high['size'] - low['size']):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
