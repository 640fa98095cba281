"""The fleet report over past runs: the history the smoke stage keeps, its trend, and a comparison of two runs.

Each run whose smoke test ran leaves the hosts' documents in <report_dir>/history/<UTC timestamp>/ (beside
<report_dir>/latest/). A run holds only the hosts tested in it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from gpufleet import report

HISTORY_DIRNAME = "history"
RUN_FORMAT = "%Y%m%dT%H%M%SZ"
RUN_NAME = re.compile(r"\d{8}T\d{6}Z")
TREND_RUNS = 10
# A slowdown after one of these changed is what an update broke; the other versions are shown as well.
UPDATE_FIELDS = ("driver", "torch")
COMPARED_FIELDS = ("driver", "cuda", "torch", "xformers")


def run_name(now: Optional[datetime] = None) -> str:
    """The history folder name of a run starting now: a UTC timestamp that sorts in time order."""
    return (now or datetime.now(timezone.utc)).strftime(RUN_FORMAT)


def history_for(directory: Path) -> Path:
    """Where the history of a report directory lives: `history` beside it (reports/latest -> reports/history)."""
    return directory.resolve().parent / HISTORY_DIRNAME


def run_dirs(history: Path) -> list[Path]:
    """The runs kept in `history`, oldest first."""
    if not history.is_dir():
        return []
    return sorted(p for p in history.iterdir() if p.is_dir() and RUN_NAME.fullmatch(p.name))


def trend(history: Path, last: int = TREND_RUNS) -> list[tuple[str, dict[str, float]]]:
    """(run, {host: headline attention TFLOP/s}) for the last `last` runs that measured any host."""
    runs = []
    for run in run_dirs(history):
        values = {h["host"]: h["attention_tflops"] for h in report.build_summary(run)["hosts"]
                  if h["attention_tflops"] is not None}
        if values:
            runs.append((run.name, values))
    return runs[-last:]


@dataclass
class HostChange:
    """One host between a previous run and this one."""

    host: str
    before: Optional[float]
    after: Optional[float]
    change_pct: Optional[float]
    changed: dict[str, tuple[Optional[str], Optional[str]]] = field(default_factory=dict)
    flagged: bool = False
    note: str = ""


def compare(current: dict, previous: dict, fraction: float = report.OUTLIER_FRACTION) -> list[HostChange]:
    """Every host of either run: its headline TFLOP/s before and now, and what versions changed.

    Flagged: slower by more than `fraction` after its driver or torch changed.
    """
    before = {h["host"]: h for h in previous["hosts"]}
    now = {h["host"]: h for h in current["hosts"]}
    changes = []
    for host in sorted(before.keys() | now.keys()):
        old, new = before.get(host), now.get(host)
        if old is None or new is None:
            changes.append(HostChange(host, old and old["attention_tflops"], new and new["attention_tflops"], None,
                                      note="new in this run" if old is None else "not in this run"))
            continue
        a, b = old["attention_tflops"], new["attention_tflops"]
        pct = round(100 * (b / a - 1), 1) if a and b is not None else None
        changed = {k: (old[k], new[k]) for k in COMPARED_FIELDS if old[k] != new[k]}
        update = [k for k in UPDATE_FIELDS if k in changed]
        flagged = pct is not None and pct < -100 * fraction and bool(update)
        note = ""
        if flagged:
            note = f"SLOWER after {' and '.join(update)} change"
        elif pct is not None and pct < -100 * fraction:
            note = "slower, same driver and torch"
        elif new["status"] != "passed":
            note = f"FAILED {new['failed_rung'] or new['status']}"
        changes.append(HostChange(host, a, b, pct, changed, flagged, note))
    return changes


def since_previous_run(history: Path, run: str) -> Optional[tuple[Path, list[HostChange]]]:
    """The hosts tested in `run` against the run before it (None when there is no earlier run)."""
    runs = run_dirs(history)
    names = [r.name for r in runs]
    if run not in names or names.index(run) == 0:
        return None
    current = report.build_summary(history / run)
    previous = runs[names.index(run) - 1]
    tested = {h["host"] for h in current["hosts"]}
    changes = compare(current, report.build_summary(previous))
    return previous, [c for c in changes if c.host in tested]


def print_compare(changes: list[HostChange], previous: Path, fraction: float, stderr: bool = False) -> None:
    """The comparison as a table that fits the terminal, version changes one line each below it."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(stderr=stderr)
    table = Table(title=f"Change since {previous.name}", box=box.SIMPLE_HEAD, collapse_padding=True,
                  pad_edge=False, show_edge=False)
    table.add_column("host", no_wrap=True)
    for name in ("before", "now", "change"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("versions changed")
    table.add_column("", no_wrap=True)
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for c in changes:
        table.add_row(c.host, fmt(c.before), fmt(c.after), "-" if c.change_pct is None else f"{c.change_pct:+.0f}%",
                      ", ".join(c.changed) or "-", c.note, style="red" if c.flagged else None)
    console.print(table)
    for c in changes:
        for key, (old, new) in c.changed.items():
            console.print(Text.assemble((c.host, "bold"), f" {key}: {old or 'none'} -> {new or 'none'}"),
                          no_wrap=True, overflow="ellipsis", crop=True)
    console.print(f"before/now: attn TFLOP/s (xformers, mean of the 16-head shapes); flagged: more than "
                  f"{fraction:.0%} slower after a driver or torch change.", style="dim", highlight=False)
