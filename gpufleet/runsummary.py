"""Read `pyinfra --json` output: per host, each operation's result (changed, no change, error), and the failed hosts.

The one reader of that output: `gpufleet run-summary`, the rollout and the lab's runner all use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

CHANGED, NO_CHANGE, ERROR = "changed", "no_change", "error"
# pyinfra's key for each result, in the order a host's operations are listed.
_RESULT_KEYS = (("success", CHANGED), ("no_change", NO_CHANGE), ("error", ERROR))


class RunSummaryError(ValueError):
    """The text is not what `pyinfra --json` prints."""


@dataclass
class OpResult:
    name: str
    status: str  # CHANGED, NO_CHANGE or ERROR


@dataclass
class RunSummary:
    """Per host its operations' results in run order; a host that ran no operation is not in `hosts`."""

    hosts: dict[str, list[OpResult]] = field(default_factory=dict)
    failed_hosts: list[str] = field(default_factory=list)

    def changes(self, host: str) -> list[str]:
        return self._named(host, CHANGED)

    def unchanged(self, host: str) -> list[str]:
        return self._named(host, NO_CHANGE)

    def errors(self, host: str) -> list[str]:
        return self._named(host, ERROR)

    def _named(self, host: str, status: str) -> list[str]:
        return [op.name for op in self.hosts.get(host, []) if op.status == status]


def load_output(text: str) -> Optional[dict[str, Any]]:
    """pyinfra's JSON document from its stdout; None when it printed nothing (it stopped before the results)."""
    if not text.strip():
        return None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise RunSummaryError(f"not JSON ({error})") from None
    if not isinstance(document, dict):
        raise RunSummaryError(f"a JSON {type(document).__name__}, not pyinfra's document (an object with 'results')")
    return document


def summarise(document: dict[str, Any]) -> RunSummary:
    """The per-host results of a `pyinfra --json` document; a dry run (results: null) has none."""
    results = document.get("results") or {}
    operations = results.get("operations", []) if isinstance(results, dict) else None
    failed = results.get("failed_hosts", []) if isinstance(results, dict) else None
    if not isinstance(operations, list) or not _names(failed):
        raise RunSummaryError("'results' is not pyinfra's (an object with a list of 'operations' and 'failed_hosts')")
    summary = RunSummary(failed_hosts=list(failed))
    for op in operations:
        if not isinstance(op, dict) or not isinstance(op.get("name"), str):
            raise RunSummaryError(f"an operation without a name: {str(op)[:200]}")
        for key, status in _RESULT_KEYS:
            hosts = op.get(key, [])
            if not _names(hosts):
                raise RunSummaryError(f"operation {op['name']!r}: {key!r} is not a list of host names")
            for host in hosts:
                summary.hosts.setdefault(host, []).append(OpResult(op["name"], status))
    return summary


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def read_output(text: str) -> Optional[RunSummary]:
    """`summarise(load_output(text))`; None when pyinfra printed nothing."""
    document = load_output(text)
    return None if document is None else summarise(document)


def summary_lines(summary: RunSummary) -> list[str]:
    """What `gpufleet run-summary` prints: per host the counts, then each change and error by name."""
    lines = []
    for name in sorted(summary.hosts):
        lines.append(f"{name}: {len(summary.changes(name))} changed, {len(summary.unchanged(name))} unchanged, "
                     f"{len(summary.errors(name))} failed")
        lines += [f"    changed: {op}" for op in summary.changes(name)]
        lines += [f"    error: {op}" for op in summary.errors(name)]
    if summary.failed_hosts:
        lines.append("failed hosts: " + ", ".join(summary.failed_hosts))
    return lines
