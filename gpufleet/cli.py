"""The `gpufleet` command: one argparse subcommand per task; `main(argv)` only dispatches."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional


def cmd_report(args: argparse.Namespace) -> int:
    """Summarise the smoke documents in a directory; exit 1 when a host failed, 2 when there is nothing to read."""
    from gpufleet import report

    directory = Path(args.dir)
    if not directory.is_dir():
        print(f"gpufleet report: {directory} is not a directory; pass the folder holding the hosts' smoke JSON",
              file=sys.stderr)
        return 2
    summary = report.write_report(directory)
    if not summary["hosts"]:
        print(f"gpufleet report: no smoke documents (*.json written by gpufleet_smoke.py) in {directory}",
              file=sys.stderr)
        return 2
    report.print_report(summary)
    print(f"wrote {directory / report.MARKDOWN_NAME} and {directory / report.JSON_NAME}", file=sys.stderr)
    return 1 if summary["counts"]["failed"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpufleet", description="Provision and check a fleet of GPU workstations.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("report", help="fleet table from the smoke test's per-host JSON documents",
                       description="Read every smoke document in DIR, print the fleet table, write "
                                   "fleet-report.md and fleet-report.json into DIR. Exit 0 when every host "
                                   "passed, 1 when any failed, 2 when DIR holds no smoke document.")
    p.add_argument("dir", help="directory holding one smoke JSON document per host")
    p.set_defaults(handler=cmd_report)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
