"""Time and peak memory of the xformers wheel build, run through the same host-side script as CI and the deploy.

    python benchmarks/xformers_build.py [--max-jobs 2] [--arch-list 12.0] [--ccache] [--cuda-home DIR]

Builds into a fresh temporary directory (never the CI cache), sampling every process of the build every 0.2 s:
prints wall time, the build's own seconds, the peak of all processes' RSS together and the largest single process.
With --ccache it builds twice with an empty ccache directory: cold, then warm.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from gpufleet.buildplan import BUILD_SCRIPT, CUBIN_READER, WheelBuild, build_command  # noqa: E402
from gpufleet_lab.ci_build import (  # noqa: E402
    ARCH_LIST, CUDA_HOME, PATCH_DIR, REPO, SDIST_SHA256, ensure_sdist, ensure_venv, find_cuobjdump,
)

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _rss_and_name(pid: int) -> tuple[int, str]:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            rss = int(handle.read().split()[1]) * PAGE
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except (OSError, IndexError, ValueError):
        return 0, ""
    source = next((a.decode(errors="replace") for a in reversed(argv) if a.endswith((b".cu", b".cpp"))), "")
    # Name compiler processes by their source file relative to the unpacked sdist.
    name = re.sub(r"^.*/src/[^/]+/", "", source) if source else (argv[0].decode(errors="replace") if argv else "")
    return rss, name


def _echo(stream: IO[str]) -> None:
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()


def measure(argv: list[str], env: dict[str, str]) -> dict[str, object]:
    """Run argv, sampling the RSS of its whole process tree; return wall time and peaks."""
    start = time.monotonic()
    # Own session, so an interrupted benchmark can stop the whole build with one signal to its group.
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    echo = threading.Thread(target=_echo, args=(proc.stdout,), daemon=True)
    echo.start()
    peak_total, peak_single, peak_single_name = 0, 0, ""
    try:
        while proc.poll() is None:
            tree, total, todo = _children(), 0, [proc.pid]
            while todo:
                pid = todo.pop()
                rss, name = _rss_and_name(pid)
                total += rss
                if rss > peak_single:
                    peak_single, peak_single_name = rss, name
                todo += tree.get(pid, [])
            peak_total = max(peak_total, total)
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
    echo.join()
    return {"exit": proc.returncode, "wall_s": round(time.monotonic() - start, 1), "peak_tree_rss": peak_total,
            "peak_process_rss": peak_single, "peak_process": peak_single_name}


def run_once(label: str, build: WheelBuild, env: dict[str, str]) -> dict[str, object]:
    figures = measure(build_command(str(REPO / BUILD_SCRIPT), build), env)
    manifest_path = Path(build.out_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    figures["build_seconds"] = manifest.get("build_seconds")
    figures["label"] = label
    return figures


def ccache_counts(env: dict[str, str]) -> str:
    """Hits and misses so far in the benchmark's own ccache directory."""
    out = subprocess.run(["ccache", "--print-stats"], env=env, capture_output=True, text=True, check=True).stdout
    stats = dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)
    hits = int(stats.get("direct_cache_hit", 0)) + int(stats.get("preprocessed_cache_hit", 0))
    return f"{hits} hits / {stats.get('cache_miss', '0')} misses (cumulative)"


def gib(value: object) -> str:
    return f"{int(value) / 1024**3:.2f} GiB"  # type: ignore[call-overload]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Measure the xformers wheel build.")
    parser.add_argument("--max-jobs", type=int, default=2)
    parser.add_argument("--arch-list", default=";".join(ARCH_LIST))
    parser.add_argument("--cuda-home", default=CUDA_HOME)
    parser.add_argument("--ccache", action="store_true", help="build twice with a fresh ccache: cold, then warm")
    args = parser.parse_args(argv)
    python = ensure_venv()
    sdist = ensure_sdist(python)
    results = []
    with tempfile.TemporaryDirectory(prefix="xformers-bench-") as tmp:
        env = dict(os.environ, CCACHE_DIR=f"{tmp}/ccache")
        runs = ["ccache cold", "ccache warm"] if args.ccache else ["plain"]
        for i, label in enumerate(runs):
            build = WheelBuild(sdist=str(sdist), sdist_sha256=SDIST_SHA256, patch_dir=str(PATCH_DIR),
                               arch_list=args.arch_list.split(";"), max_jobs=args.max_jobs, python=str(python),
                               cuda_home=args.cuda_home, out_dir=f"{tmp}/out{i}", fingerprint=f"bench-{i}",
                               ccache=args.ccache, cubins_reader=str(REPO / CUBIN_READER),
                               cuobjdump=find_cuobjdump(python))
            results.append(run_once(label, build, env))
            if args.ccache:
                results[-1]["ccache"] = ccache_counts(env)
    print(f"\nxformers 0.0.35 build, arch {args.arch_list}, MAX_JOBS={args.max_jobs}, {os.cpu_count()} CPUs, "
          f"CUDA {args.cuda_home}, load average at the end {os.getloadavg()[0]:.1f}")
    print(f"{'run':<12} {'exit':>4} {'wall':>8} {'build':>7} {'peak tree RSS':>14} {'peak process':>13}  largest process")
    for r in results:
        print(f"{r['label']:<12} {r['exit']:>4} {r['wall_s']:>7}s {(str(r['build_seconds']) + 's') if r['build_seconds'] is not None else '-':>7} "
              f"{gib(r['peak_tree_rss']):>14} {gib(r['peak_process_rss']):>13}  {r['peak_process']}")
        if "ccache" in r:
            print(f"{'':<12} ccache: {r['ccache']}")
    return 0 if all(r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
