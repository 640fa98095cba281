"""The fleet table for a terminal: fits the console's width (80 columns and up), never folds a host name.

Versions every host shares go in one line above the table; a version column appears only where hosts differ,
and where those columns do not fit, hosts get a stack letter explained below the table. Failed and slow hosts get
one line each below it. From DETAIL_WIDTH columns on, the table adds per-shape figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from gpufleet import report

DETAIL_WIDTH = 200
VERSION_FIELDS = (("driver", "driver"), ("cuda", "CUDA"), ("torch", "torch"), ("xformers", "xformers"))


@dataclass
class Versions:
    """Which versions all hosts share (`common`), which differ (`differing`), and each host's stack letter."""

    common: dict[str, str]
    some_missing: bool
    differing: list[tuple[str, str]]
    stacks: dict[str, str]
    stack_values: dict[str, tuple[Optional[str], ...]]


def versions(hosts: list[dict]) -> Versions:
    common: dict[str, str] = {}
    differing = []
    some_missing = False
    for key, label in VERSION_FIELDS:
        values = {h[key] for h in hosts if h[key]}
        if len(values) == 1:
            common[label] = values.pop()
            some_missing |= any(not h[key] for h in hosts)
        elif values:
            differing.append((key, label))
    stacks: dict[str, str] = {}
    stack_values: dict[str, tuple[Optional[str], ...]] = {}
    letters: dict[tuple[Optional[str], ...], str] = {}
    for h in hosts:
        values = tuple(h[key] for key, _ in differing)
        if values not in letters:
            letters[values] = chr(ord("A") + len(letters)) if len(letters) < 26 else str(len(letters) + 1)
            stack_values[letters[values]] = values
        stacks[h["host"]] = letters[values]
    return Versions(common, some_missing, differing, stacks, stack_values)


def _fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}{suffix}" if isinstance(value, float) else f"{value}{suffix}"


def status_word(h: dict) -> str:
    if h["status"] == "unreadable":
        return "UNREADABLE"
    if h["status"] != "passed":
        return "FAILED"
    if h["flagged_slow"]:
        return f"SLOW -{h['below_median_pct']:.0f}%"
    return "ok"


def detail_shapes(hosts: list[dict]) -> list[str]:
    """The 16-head shapes (the headline's), in the order the smoke test measured them."""
    seen: list[str] = []
    for h in hosts:
        for s in h["shapes"]:
            if s["heads"] == report.WIDE_HEADS and s["shape"] not in seen:
                seen.append(s["shape"])
    return seen


def build_table(summary: dict, v: Versions, *, split_versions: bool, sm: bool, shapes: list[str]) -> Table:
    hosts = summary["hosts"]
    table = Table(title="gpufleet smoke report", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False,
                  show_edge=False)
    table.add_column("host", no_wrap=True)
    table.add_column("GPU", no_wrap=True)
    if split_versions:
        for _, label in v.differing:
            table.add_column(label, no_wrap=True)
    elif v.differing:
        table.add_column("stack", no_wrap=True)
    if sm:
        table.add_column("sm code", no_wrap=True)
    table.add_column("attn\nTFLOP/s", justify="right", no_wrap=True)
    table.add_column("vs\nSDPA", justify="right", no_wrap=True)
    table.add_column("vs\nseed", justify="right", no_wrap=True)
    for shape in shapes:
        batch, seq, _, dim = shape.split("x")
        table.add_column(f"{batch}x{seq}\nx{dim}", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for h in hosts:
        row = [h["host"] + ("*" if h["synthetic"] else ""), _fmt(h["gpu_short"])]
        if split_versions:
            row += [_fmt(h[key]) for key, _ in v.differing]
        elif v.differing:
            row.append(v.stacks[h["host"]])
        if sm:
            row.append(_fmt(h["sm_code"]))
        row += [_fmt(h["attention_tflops"]), _fmt(h["vs_sdpa"], 2, "x"), _fmt(h["vs_seed"], 2, "x")]
        by_shape = {s["shape"]: s["xformers"] for s in h["shapes"]}
        row += [_fmt(by_shape.get(shape)) for shape in shapes]
        row.append(status_word(h))
        style = "red" if h["status"] != "passed" else ("yellow" if h["flagged_slow"] else None)
        table.add_row(*row, style=style)
    return table


def fitting_table(summary: dict, v: Versions, width: int, console: Console) -> tuple[Table, bool]:
    """The richest table whose natural width fits; also whether it shows versions per column (else stacks)."""
    shapes = detail_shapes(summary["hosts"]) if width >= DETAIL_WIDTH else []
    layouts = [dict(split_versions=True, sm=True, shapes=shapes), dict(split_versions=True, sm=True, shapes=[]),
               dict(split_versions=True, sm=False, shapes=[]), dict(split_versions=False, sm=False, shapes=[])]
    for layout in layouts:
        table = build_table(summary, v, **layout)
        if Measurement.get(console, console.options.update_width(10 * width), table).maximum <= width:
            return table, layout["split_versions"]
    return table, False


def one_line(console: Console, text: Text) -> None:
    console.print(text, no_wrap=True, overflow="ellipsis", crop=True)


def print_table(summary: dict, console: Console) -> None:
    hosts = summary["hosts"]
    width = console.width
    v = versions(hosts)
    c = summary["counts"]
    counts = f"{c['hosts']} hosts: {c['passed']} passed, {c['failed']} failed, {c['flagged_slow']} slow."
    if v.common:
        who = "Same on every host that reports it:" if v.some_missing else "Same on every host:"
        console.print(f"{counts} {who}", highlight=False)
        console.print(", ".join(f"{label} {value}" for label, value in v.common.items()), highlight=False)
    else:
        console.print(counts, highlight=False)
    table, split = fitting_table(summary, v, width, console)
    console.print(table)
    if v.differing and not split:
        for letter, values in v.stack_values.items():
            parts = ", ".join(f"{label} {value or 'none'}" for (_, label), value in zip(v.differing, values))
            console.print(f"stack {letter}: {parts}", highlight=False)
    for h in hosts:
        if h["status"] != "passed":
            where = h["failed_rung"] or h["status"]
            one_line(console, Text.assemble((h["host"], "red"), f" failed at {where}: {h['message']}"))
        elif h["flagged_slow"]:
            one_line(console, Text.assemble((h["host"], "yellow"), f" is {h['below_median_pct']:.0f}% below the "
                                            f"{h['gpu_short']} median of {h['model_median_tflops']} TFLOP/s"))
    notes = ["attn: xformers TFLOP/s, fp16 forward, mean of the 16-head shapes", "vs SDPA: xformers/SDPA",
             "vs seed: tokens/s over the seed's RTX 5090 D figures"]
    if any(h["synthetic"] for h in hosts):
        notes.append("* synthetic document")
    console.print("; ".join(notes) + ".", style="dim", highlight=False)
    if width >= DETAIL_WIDTH:
        seeds = report.seed_rows(summary)
        if seeds:
            seed_table = Table(title="Seed shapes, xformers tokens/s", box=box.SIMPLE_HEAD)
            for name in ["host"] + list(report.SEED_REFERENCE_TOK_S):
                seed_table.add_column(name, no_wrap=True)
            for row in seeds:
                seed_table.add_row(*row)
            console.print(seed_table)
