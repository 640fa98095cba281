"""Summarise `pyinfra --json` results per host: changed, unchanged and failed operations (python -m gpufleet.runsummary)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def summarise(document: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    """host -> {"changed": [...op names], "no_change": [...], "error": [...]}."""
    per_host: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"changed": [], "no_change": [], "error": []})
    for op in (document.get("results") or {}).get("operations", []):
        for key, bucket in (("success", "changed"), ("no_change", "no_change"), ("error", "error")):
            for name in op[key]:
                per_host[name][bucket].append(op["name"])
    return dict(per_host)


def main(path: str) -> int:
    text = Path(path).read_text()
    if not text.strip():
        print(f"{path}: no JSON (pyinfra stopped before printing results; see its stderr)")
        return 1
    document = json.loads(text)
    summary = summarise(document)
    for name, buckets in sorted(summary.items()):
        print(f"{name}: {len(buckets['changed'])} changed, {len(buckets['no_change'])} unchanged, "
              f"{len(buckets['error'])} failed")
        for bucket in ("changed", "error"):
            for op in buckets[bucket]:
                print(f"    {bucket}: {op}")
    failed = (document.get("results") or {}).get("failed_hosts", [])
    if failed:
        print("failed hosts:", ", ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
