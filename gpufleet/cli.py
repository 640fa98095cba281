"""The `gpufleet` command: one argparse subcommand per task; `main(argv)` only dispatches."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional


def cmd_report(args: argparse.Namespace) -> int:
    """Summarise the smoke documents in a directory; exit 1 when a host failed, 2 when there is nothing to read."""
    from gpufleet import report, report_history, report_html

    directory = Path(args.dir)
    for label, folder in (("", directory), ("--compare ", args.compare), ("--history ", args.history)):
        if folder is not None and not Path(folder).is_dir():
            print(f"gpufleet report: {label}{folder} is not a directory; pass the folder holding the hosts' smoke JSON"
                  + (" (a run under reports/history)" if label == "--compare " else ""), file=sys.stderr)
            return 2
    if args.trend_runs < 1:
        print(f"gpufleet report: --trend-runs {args.trend_runs} must be 1 or more", file=sys.stderr)
        return 2
    summary = report.write_report(directory, Path(args.history) if args.history else None, args.trend_runs)
    if not summary["hosts"]:
        print(f"gpufleet report: no smoke documents (*.json written by gpufleet_smoke.py) in {directory}",
              file=sys.stderr)
        return 2
    report.print_report(summary)
    if args.compare:
        previous = Path(args.compare)
        before = report.build_summary(previous)
        if not before["hosts"]:
            print(f"gpufleet report: no smoke documents in {previous} to compare with", file=sys.stderr)
            return 2
        changes = report_history.compare(summary, before, summary["outlier_fraction"])
        report_history.print_compare(changes, previous, summary["outlier_fraction"])
    from rich.console import Console

    written = ", ".join((report.MARKDOWN_NAME, report.JSON_NAME, report_html.HTML_NAME))
    Console(stderr=True, highlight=False).print(f"wrote {written} in {directory}", overflow="fold")
    return 1 if summary["counts"]["failed"] else 0


def cmd_check_inventory(args: argparse.Namespace) -> int:
    """Validate the inventory without contacting any host; exit 2 with every problem listed."""
    from gpufleet.inventory import InventoryError, load_inventory

    try:
        inventory = load_inventory(args.file)
    except InventoryError as error:
        print(f"gpufleet: invalid inventory {error}", file=sys.stderr)
        return 2
    groups: dict[str, list[str]] = {}
    for spec in inventory.hosts:
        groups.setdefault(spec.group, []).append(spec.name)
    listing = "; ".join(f"{group}: {', '.join(names)}" for group, names in groups.items())
    print(f"{inventory.path}: valid, {len(inventory.hosts)} host(s) ({listing})")
    return 0


def cmd_cache_stats(args: argparse.Namespace) -> int:
    """Hits, misses, bytes saved, bytes per client and disk use, read over SSH from the cache host's servers."""
    import shlex
    import subprocess

    from gpufleet import cache_stats
    from gpufleet.inventory import InventoryError, load_inventory
    from gpufleet.settings import load_settings

    try:
        inventory = load_inventory(args.file)
    except InventoryError as error:
        print(f"gpufleet: invalid inventory {error}", file=sys.stderr)
        return 2
    spec = inventory.cache_host
    if spec is None:
        print(f"gpufleet cache-stats: {inventory.path} has no host in group 'cache'; nothing to ask", file=sys.stderr)
        return 2
    cache_dir = spec.settings.get("cache_dir", load_settings()["cache_dir"].default)
    command = cache_stats.stats_command(cache_dir)
    conn = spec.connection
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10"]
    for key, option in (("ssh_key", "-i"), ("ssh_port", "-p")):
        if key in conn:
            ssh += [option, str(Path(str(conn[key])).expanduser()) if key == "ssh_key" else str(conn[key])]
    if "ssh_known_hosts_file" in conn:
        ssh += ["-o", f"UserKnownHostsFile={Path(conn['ssh_known_hosts_file']).expanduser()}"]
    remote = f"sudo -n sh -c {shlex.quote(command)}" if conn.get("sudo") else command
    proc = subprocess.run(cache_stats_argv(ssh, conn.get("ssh_user"), spec.address, remote),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"gpufleet cache-stats: could not read the logs on {spec.name} ({spec.address}): "
              f"{proc.stderr.strip() or f'ssh exit {proc.returncode}'}", file=sys.stderr)
        return 1
    print("\n".join(cache_stats.report_lines(cache_stats.parse_stats_output(proc.stdout))))
    return 0


def cache_stats_argv(ssh: list[str], user: str | None, address: str, remote: str) -> list[str]:
    """ssh's argv: the destination after `--`, so no inventory value is ever read as an ssh option."""
    return [*ssh, "--", f"{user}@{address}" if user else address, remote]


def cmd_rollout(args: argparse.Namespace) -> int:
    """deploys/full.py a canary, then a batch at a time, each batch health-gated; see gpufleet/rollout.py."""
    from rich.console import Console

    from gpufleet import rollout
    from gpufleet.inventory import InventoryError, load_inventory

    try:
        inventory = load_inventory(args.inventory)
    except InventoryError as error:
        print(f"gpufleet: invalid inventory {error}", file=sys.stderr)
        return 2
    limit = [p.strip() for value in args.limit for p in value.split(",") if p.strip()]
    try:
        return rollout.rollout(inventory, Path(args.deploy), args.canary, args.batch, args.max_failed, limit,
                               Console(stderr=True), extra=["-v"] if args.verbose else [])
    except rollout.RolloutError as error:
        print(f"gpufleet rollout: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpufleet rollout: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


def cmd_run_summary(args: argparse.Namespace) -> int:
    """Per host the changed, unchanged and failed operations of a `pyinfra --json` run; exit 2 on bad input."""
    from gpufleet.runsummary import RunSummaryError, read_output, summary_lines

    where = "stdin" if args.file == "-" else args.file
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        summary = read_output(text)
    except (OSError, UnicodeDecodeError) as error:
        print(f"gpufleet run-summary: cannot read {where}: {error}", file=sys.stderr)
        return 2
    except RunSummaryError as error:
        print(f"gpufleet run-summary: {where} is not the output of `pyinfra --json`: {error}", file=sys.stderr)
        return 2
    if summary is None:
        print(f"gpufleet run-summary: {where} is empty (pyinfra stopped before printing its results; see its log)",
              file=sys.stderr)
        return 1
    print("\n".join(summary_lines(summary)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpufleet", description="Provision and check a fleet of GPU workstations.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("report", help="fleet table from the smoke test's per-host JSON documents",
                       description="Read every smoke document in DIR, print the fleet table (fitted to the "
                                   "terminal's width), write fleet-report.md, fleet-report.json and "
                                   "fleet-report.html into DIR. Exit 0 when every host passed, 1 when any failed, "
                                   "2 when DIR holds no smoke document.")
    p.add_argument("dir", help="directory holding one smoke JSON document per host (e.g. reports/latest)")
    p.add_argument("--compare", metavar="PREVIOUS",
                   help="a previous run's directory (e.g. reports/history/20261201T101500Z): show each host's change "
                        "in TFLOP/s and versions, flag a host that got slower after a driver or torch change")
    p.add_argument("--history", metavar="DIR",
                   help="the runs kept by the smoke stage, for the HTML trend (default: 'history' beside DIR)")
    p.add_argument("--trend-runs", type=int, default=10, metavar="N",
                   help="how many of the last runs the HTML trend shows (default: 10)")
    p.set_defaults(handler=cmd_report)
    c = sub.add_parser("check-inventory", help="validate the inventory without contacting any host",
                       description="Validate the inventory (default: $GPUFLEET_INVENTORY or inventory/hosts.yaml) "
                                   "and list every problem with file, line, key and fix. Exit 0 when valid, 2 when not.")
    c.add_argument("file", nargs="?", help="inventory YAML (default: $GPUFLEET_INVENTORY or inventory/hosts.yaml)")
    c.set_defaults(handler=cmd_check_inventory)
    s = sub.add_parser("cache-stats", help="hits, misses, bytes saved, per client and on disk of the fleet cache",
                       description="Read apt-cacher-ng's transfer log and devpi-server's log on the inventory's "
                                   "cache host over SSH and print requests answered from the cache (hits), fetched "
                                   "upstream (misses), bytes saved, the disk each server's cache uses (du), and the "
                                   "bytes each client address was sent. Exit 0, 1 when the host cannot be read, "
                                   "2 without a cache host.")
    s.add_argument("file", nargs="?", help="inventory YAML (default: $GPUFLEET_INVENTORY or inventory/hosts.yaml)")
    s.set_defaults(handler=cmd_cache_stats)
    r = sub.add_parser("rollout", help="deploy to a canary, then batch by batch, each batch health-gated",
                       description="Run deploys/full.py through pyinfra on the canary hosts, then on each batch "
                                   "(pyinfra --limit). A batch passes when every host converged and its smoke test "
                                   "passed; otherwise the rollout stops there, naming the hosts and the failed rung, "
                                   "and later batches are not touched. Run it again to continue. Exit 0 when every "
                                   "host is converged, 1 when the rollout stopped, 2 on bad input.")
    r.add_argument("inventory", nargs="?", help="inventory YAML (default: $GPUFLEET_INVENTORY or inventory/hosts.yaml)")
    r.add_argument("--canary", type=int, default=1, metavar="N", help="hosts in the first batch (default 1)")
    r.add_argument("--batch", type=int, default=5, metavar="N", help="hosts per later batch (default 5)")
    r.add_argument("--max-failed", type=int, default=0, metavar="N",
                   help="failed or reboot-pending hosts tolerated before the rollout stops (default 0)")
    r.add_argument("--limit", action="append", default=[], metavar="HOSTS",
                   help="only these hosts: names, groups or globs, comma-separated or repeated")
    r.add_argument("--deploy", default=str(Path(__file__).resolve().parents[1] / "deploys" / "full.py"),
                   help="deploy file (default: deploys/full.py)")
    r.add_argument("-v", "--verbose", action="store_true", help="pass -v to pyinfra")
    r.set_defaults(handler=cmd_rollout)
    m = sub.add_parser("run-summary", help="per-host changes and errors of a `pyinfra --json` run",
                       description="Read what `pyinfra -y --json` printed on stdout and list per host how many "
                                   "operations changed something, changed nothing and failed, with the names of the "
                                   "changed and failed ones. Exit 0, 1 when the output is empty (pyinfra stopped "
                                   "early), 2 when it is not pyinfra's JSON.")
    m.add_argument("file", nargs="?", default="-", help="the saved JSON output (default: read stdin)")
    m.set_defaults(handler=cmd_run_summary)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
