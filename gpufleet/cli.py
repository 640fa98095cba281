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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpufleet", description="Provision and check a fleet of GPU workstations.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("report", help="fleet table from the smoke test's per-host JSON documents",
                       description="Read every smoke document in DIR, print the fleet table, write "
                                   "fleet-report.md and fleet-report.json into DIR. Exit 0 when every host "
                                   "passed, 1 when any failed, 2 when DIR holds no smoke document.")
    p.add_argument("dir", help="directory holding one smoke JSON document per host")
    p.set_defaults(handler=cmd_report)
    c = sub.add_parser("check-inventory", help="validate the inventory without contacting any host",
                       description="Validate the inventory (default: $GPUFLEET_INVENTORY or inventory/hosts.yaml) "
                                   "and list every problem with file, line, key and fix. Exit 0 when valid, 2 when not.")
    c.add_argument("file", nargs="?", help="inventory YAML (default: $GPUFLEET_INVENTORY or inventory/hosts.yaml)")
    c.set_defaults(handler=cmd_check_inventory)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
