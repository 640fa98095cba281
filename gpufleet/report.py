"""Fleet report: reads the smoke test's JSON documents (one per host) from a directory and summarises them.

Writes `fleet-report.md` and `fleet-report.json` into that directory and returns the summary, which the CLI
prints as a rich table. A host whose attention throughput is more than OUTLIER_FRACTION below the median of
the hosts with the same GPU model is flagged; failed hosts show the rung they failed at.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from gpufleet.decide import RTX_5090_D, RTX_5090_D_V2

SUPPORTED_SCHEMA = 1
OUTLIER_FRACTION = 0.15
MARKDOWN_NAME = "fleet-report.md"
JSON_NAME = "fleet-report.json"
HTML_NAME = "fleet-report.html"
# The HTML page names the inputs it was drawn from, so a run whose results did not change skips matplotlib.
_RENDER_KEY = re.compile(r'<meta name="gpufleet-report-key" content="([0-9a-f]{64})">')
WIDE_HEADS = 16

# The seed document's RTX 5090 D table, in tokens per second, by batch x seq x head_dim (head count not stated).
SEED_REFERENCE_TOK_S: dict[str, float] = {
    "2x1024x64": 19.9e6,
    "2x2048x64": 46.4e6,
    "1x4096x64": 60.4e6,
    "1x8192x64": 61.1e6,
    "1x16384x64": 42.0e6,
}
# PCI device IDs of the GPUs the seed figures apply to.
SEED_REFERENCE_PCI_IDS = {RTX_5090_D, RTX_5090_D_V2}


@dataclass
class HostResult:
    """One host's row in the report, read from its smoke document (or the reason it could not be read)."""

    host: str
    source: str
    status: str
    gpu: Optional[str] = None
    gpu_model: Optional[str] = None
    pci_device_id: Optional[str] = None
    driver: Optional[str] = None
    cuda: Optional[str] = None
    torch: Optional[str] = None
    xformers: Optional[str] = None
    sm_code: Optional[str] = None
    failed_rung: Optional[str] = None
    message: str = ""
    attention_tflops: Optional[float] = None
    vs_sdpa: Optional[float] = None
    gemm_tflops: Optional[float] = None
    seed_tok_s: dict[str, float] = field(default_factory=dict)
    vs_seed: Optional[float] = None
    model_median_tflops: Optional[float] = None
    below_median_pct: Optional[float] = None
    flagged_slow: bool = False
    synthetic: bool = False
    finished_at: Optional[str] = None
    gpu_short: Optional[str] = None
    rungs: list[dict] = field(default_factory=list)
    shapes: list[dict] = field(default_factory=list)


def shape_key(batch: int, seq: int, head_dim: int) -> str:
    return f"{batch}x{seq}x{head_dim}"


_GPU_NAME_NOISE = re.compile(r"^(NVIDIA|GeForce|Tesla)$|^\d+GB$|^HBM\w*$", re.IGNORECASE)


def short_gpu_name(name: Optional[str]) -> Optional[str]:
    """The name people say: "NVIDIA GeForce RTX 5090 D V2" -> "RTX 5090 D v2", "NVIDIA H100 80GB HBM3" -> "H100"."""
    if not name:
        return None
    words = [w for w in re.sub(r"-\d+GB\b", "", name).split() if not _GPU_NAME_NOISE.match(w)]
    # Drivers spell the 5090 D v2 both "D v2" and "D V2".
    return " ".join("v2" if w == "V2" else w for w in words) or name


def rung_cells(doc: dict) -> list[dict]:
    """Each rung's id, title and pass/fail/skip (a rung not run because an earlier one failed is a skip)."""
    cells = []
    for rung in doc.get("rungs", []):
        status = rung.get("status")
        cells.append({"id": str(rung.get("id")), "title": str(rung.get("title", "")),
                      "state": {"passed": "pass", "failed": "fail"}.get(status, "skip"),
                      "message": str(rung.get("message", ""))})
    return cells


def _tflops(figure: Any) -> Optional[float]:
    return figure.get("tflops") if isinstance(figure, dict) else None


def shape_figures(figures: dict, seed_gpu: bool) -> list[dict]:
    """Per shape: xformers, SDPA and naive TFLOP/s, and the seed's 5090 D figure in TFLOP/s where the GPU matches.

    The seed publishes tokens/s; for the same shape and head count FLOPs scale with tokens, so its TFLOP/s is the
    host's xformers TFLOP/s times seed tokens/s over the host's tokens/s.
    """
    shapes = []
    for e in figures.get("attention", []):
        xf = e.get("xformers") or {}
        key = shape_key(e["batch"], e["seq"], e["head_dim"])
        seed = None
        if (seed_gpu and e.get("set") == "seed" and e.get("heads") == figures.get("heads")
                and key in SEED_REFERENCE_TOK_S and xf.get("tok_per_s") and xf.get("tflops")):
            seed = round(xf["tflops"] * SEED_REFERENCE_TOK_S[key] / xf["tok_per_s"], 2)
        shapes.append({"set": e.get("set"), "shape": f"{e['batch']}x{e['seq']}x{e.get('heads')}x{e['head_dim']}",
                       "batch": e["batch"], "seq": e["seq"], "heads": e.get("heads"), "head_dim": e["head_dim"],
                       "xformers": _tflops(xf), "sdpa": _tflops(e.get("sdpa")), "naive": _tflops(e.get("naive")),
                       "seed": seed})
    return shapes


def matches_seed_gpu(pci_device_id: Optional[str], name: Optional[str]) -> bool:
    if pci_device_id:
        return pci_device_id.lower() in SEED_REFERENCE_PCI_IDS
    # Names differ in case between drivers ("D v2" / "D V2"), hence lower().
    return bool(name) and "rtx 5090 d" in name.lower()


def headline(figures: dict) -> tuple[Optional[float], Optional[float]]:
    """Mean xformers TFLOP/s and mean xformers/SDPA ratio over the 16-head shapes (or all shapes if none)."""
    entries = [e for e in figures.get("attention", []) if "tflops" in e.get("xformers", {})]
    wide = [e for e in entries if e.get("heads") == WIDE_HEADS] or entries
    if not wide:
        return None, None
    tflops = statistics.fmean(e["xformers"]["tflops"] for e in wide)
    ratios = [e["xformers_vs_sdpa"] for e in wide if e.get("xformers_vs_sdpa") is not None]
    return round(tflops, 2), (round(statistics.fmean(ratios), 3) if ratios else None)


def sm_code_cell(doc: dict) -> Optional[str]:
    """What the SASS rung proved: 'sm_120' (ran with PTX JIT off), 'no sm_120' (failed), None (not reached)."""
    rung = next((r for r in doc.get("rungs", []) if r.get("id") == "sp24_sass"), None)
    if rung is None or rung.get("status") == "not_run":
        return None
    arch = rung.get("details", {}).get("arch") or "sm_?"
    return arch if rung.get("status") == "passed" else f"no {arch}"


def failure_message(doc: dict) -> str:
    """The failed rung's own message (what was found and the fix), else the document's summary."""
    failed = next((r for r in doc.get("rungs", []) if r.get("id") == doc.get("failed_rung")), None)
    return str(failed.get("message", "")) if failed else str(doc.get("message", ""))


def read_host(path: Path) -> Optional[HostResult]:
    """The row for one JSON file; None for JSON that is not a smoke document (e.g. our own summary)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return HostResult(host=path.stem, source=path.name, status="unreadable",
                          message=f"{path.name} is not valid JSON ({exc}); rerun the smoke test on that host")
    if not isinstance(doc, dict) or doc.get("tool") != "gpufleet_smoke":
        return None
    host = str(doc.get("host") or path.stem)
    if doc.get("schema_version") != SUPPORTED_SCHEMA:
        return HostResult(host=host, source=path.name, status="unreadable",
                          message=f"schema_version {doc.get('schema_version')!r}, this gpufleet reads "
                                  f"{SUPPORTED_SCHEMA}: use the smoke script and report of the same gpufleet")
    gpu = doc.get("gpu") or {}
    versions = doc.get("versions") or {}
    torch_version = versions.get("torch")
    result = HostResult(
        host=host,
        source=path.name,
        status=str(doc.get("status", "unknown")),
        gpu=gpu.get("name"),
        pci_device_id=gpu.get("pci_device_id"),
        gpu_model=(gpu.get("pci_device_id") or gpu.get("name") or "unknown").upper(),
        driver=versions.get("driver"),
        cuda=versions.get("cuda_toolkit"),
        torch=torch_version,
        xformers=versions.get("xformers"),
        sm_code=sm_code_cell(doc),
        failed_rung=doc.get("failed_rung"),
        message=failure_message(doc),
        synthetic=bool(doc.get("synthetic", False)),
        finished_at=doc.get("finished_at"),
        gpu_short=short_gpu_name(gpu.get("name")),
        rungs=rung_cells(doc),
    )
    figures = doc.get("figures") or {}
    if figures:
        result.attention_tflops, result.vs_sdpa = headline(figures)
        result.gemm_tflops = (figures.get("gemm") or {}).get("tflops")
        heads = figures.get("heads")
        for e in figures.get("attention", []):
            if e.get("set") == "seed" and e.get("heads") == heads and "tok_per_s" in e.get("xformers", {}):
                result.seed_tok_s[shape_key(e["batch"], e["seq"], e["head_dim"])] = e["xformers"]["tok_per_s"]
        result.shapes = shape_figures(figures, matches_seed_gpu(result.pci_device_id, result.gpu))
        if matches_seed_gpu(result.pci_device_id, result.gpu):
            ratios = [result.seed_tok_s[k] / ref for k, ref in SEED_REFERENCE_TOK_S.items() if k in result.seed_tok_s]
            result.vs_seed = round(statistics.fmean(ratios), 3) if ratios else None
    return result


def latest_per_host(results: list[HostResult]) -> tuple[list[HostResult], list[str]]:
    """One row per host: the document that finished last; also the files that were superseded."""
    by_host: dict[str, HostResult] = {}
    superseded = []
    for r in sorted(results, key=lambda r: (r.finished_at or "", r.source)):
        if r.host in by_host:
            superseded.append(by_host[r.host].source)
        by_host[r.host] = r
    return sorted(by_host.values(), key=lambda r: r.host), superseded


def flag_outliers(results: list[HostResult], fraction: float = OUTLIER_FRACTION) -> None:
    """Flag passed hosts more than `fraction` below the median attention TFLOP/s of their GPU model."""
    models: dict[str, list[HostResult]] = {}
    for r in results:
        if r.status == "passed" and r.attention_tflops is not None:
            models.setdefault(r.gpu_model or "UNKNOWN", []).append(r)
    for members in models.values():
        median = statistics.median(r.attention_tflops for r in members)
        for r in members:
            r.model_median_tflops = round(median, 2)
            r.below_median_pct = round(100 * (1 - r.attention_tflops / median), 1) if median else None
            r.flagged_slow = r.attention_tflops < (1 - fraction) * median


def status_cell(r: HostResult) -> str:
    if r.status == "unreadable":
        return "UNREADABLE"
    if r.status != "passed":
        return f"FAILED at {r.failed_rung or '?'}"
    if r.flagged_slow:
        return (f"SLOW: {r.below_median_pct:.0f}% below the {r.gpu} median of {r.model_median_tflops} TFLOP/s")
    return "ok"


def build_summary(directory: Path) -> dict:
    """Read every smoke document in `directory` and return the fleet summary (the JSON written beside them)."""
    rows = []
    for path in sorted(directory.glob("*.json")):
        if path.name == JSON_NAME:
            continue
        row = read_host(path)
        if row is not None:
            rows.append(row)
    hosts, superseded = latest_per_host(rows)
    flag_outliers(hosts)
    return {
        "report_schema_version": 1,
        "directory": str(directory),
        "outlier_fraction": OUTLIER_FRACTION,
        "seed_reference_tok_s": SEED_REFERENCE_TOK_S,
        "hosts": [asdict(h) | {"status_text": status_cell(h)} for h in hosts],
        "superseded_files": superseded,
        "counts": {
            "hosts": len(hosts),
            "passed": sum(h.status == "passed" for h in hosts),
            "failed": sum(h.status != "passed" for h in hosts),
            "flagged_slow": sum(h.flagged_slow for h in hosts),
        },
    }


def _fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


TABLE_COLUMNS = ["host", "GPU", "driver", "CUDA", "torch", "xformers", "sm code", "attn TFLOP/s", "vs SDPA",
                 "vs seed 5090 D", "status"]


def table_rows(summary: dict) -> list[list[str]]:
    rows = []
    for h in summary["hosts"]:
        rows.append([
            h["host"] + (" (synthetic)" if h["synthetic"] else ""),
            _fmt(h["gpu"]), _fmt(h["driver"]), _fmt(h["cuda"]), _fmt(h["torch"]), _fmt(h["xformers"]),
            _fmt(h["sm_code"]), _fmt(h["attention_tflops"]), _fmt(h["vs_sdpa"], 2, "x"), _fmt(h["vs_seed"], 2, "x"),
            h["status_text"],
        ])
    return rows


def seed_rows(summary: dict) -> list[list[str]]:
    """Per-shape tokens/s of the hosts whose GPU the seed figures are for, then the seed's own row."""
    rows = []
    for h in summary["hosts"]:
        if h["seed_tok_s"] and matches_seed_gpu(h["pci_device_id"], h["gpu"]):
            measured = h["seed_tok_s"]
            rows.append([h["host"]] + [f"{measured[k] / 1e6:.1f}M" if k in measured else "-"
                                       for k in SEED_REFERENCE_TOK_S])
    if rows:
        rows.append(["seed RTX 5090 D (published)"] + [f"{v / 1e6:.1f}M" for v in SEED_REFERENCE_TOK_S.values()])
    return rows


def problem_rows(summary: dict) -> list[tuple[str, str, str]]:
    """(host, failed rung or 'unreadable', message) for every host that did not pass."""
    return [(h["host"], h["failed_rung"] or h["status"], h["message"]) for h in summary["hosts"]
            if h["status"] != "passed"]


def render_markdown(summary: dict) -> str:
    def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
        clean = [[c.replace("|", "\\|").replace("\n", " ") for c in row] for row in rows]
        return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                + ["| " + " | ".join(row) + " |" for row in clean])

    c = summary["counts"]
    lines = [
        "# gpufleet smoke report",
        "",
        f"{c['hosts']} host(s): {c['passed']} passed, {c['failed']} failed, {c['flagged_slow']} flagged slow "
        f"(more than {summary['outlier_fraction']:.0%} below the median of their GPU model).",
        "",
        "attn TFLOP/s: xformers memory_efficient_attention, fp16 forward, mean over the 16-head shapes; "
        "vs SDPA: its ratio to torch scaled_dot_product_attention on the same shapes; "
        "vs seed 5090 D: tokens/s over the seed document's published RTX 5090 D figures (head count not stated there).",
        "",
    ]
    lines += md_table(TABLE_COLUMNS, table_rows(summary))
    seeds = seed_rows(summary)
    if seeds:
        lines += ["", "## Seed shapes, xformers tokens/s (batch x seq x head_dim)", ""]
        lines += md_table(["host"] + list(SEED_REFERENCE_TOK_S), seeds)
    problems = problem_rows(summary)
    if problems:
        lines += ["", "## Failed hosts", ""] + [f"- **{host}** ({where}): {message}" for host, where, message in problems]
    if summary["superseded_files"]:
        lines += ["", "Older documents of the same hosts, not shown: " + ", ".join(summary["superseded_files"])]
    return "\n".join(lines) + "\n"


def write_report(directory: Path, history: Optional[Path] = None, trend_runs: Optional[int] = None) -> dict:
    """Build the summary of `directory` and write fleet-report.json, .md and .html into it.

    The HTML shows the trend of the last `trend_runs` runs kept in `history` (default: `history` beside
    `directory`, when it exists).
    """
    from gpufleet import report_history

    summary = build_summary(directory)
    (directory / JSON_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (directory / MARKDOWN_NAME).write_text(render_markdown(summary), encoding="utf-8")
    history = report_history.history_for(directory) if history is None else history
    trend = report_history.trend(history, trend_runs or report_history.TREND_RUNS)
    key = render_key(summary, trend)
    page = directory / HTML_NAME
    if drawn_from(page) != key:
        from gpufleet import report_html

        page.write_text(report_html.render_html(summary, trend, key), encoding="utf-8")
    return summary


def render_key(summary: dict, trend: list) -> str:
    """What the HTML page is a function of: the summary, the trend, the report's code and matplotlib's version."""
    from importlib.metadata import version

    digest = hashlib.sha256(json.dumps([summary, trend], sort_keys=True).encode())
    for code in ("report.py", "report_html.py"):
        digest.update(Path(__file__).with_name(code).read_bytes())
    digest.update(version("matplotlib").encode())
    return digest.hexdigest()


def drawn_from(page: Path) -> Optional[str]:
    """The render key an existing HTML page was drawn from; None when there is no page or it names none."""
    try:
        with page.open(encoding="utf-8", errors="replace") as f:
            found = _RENDER_KEY.search(f.read(4096))
    except OSError:
        return None
    return found.group(1) if found else None


def print_report(summary: dict, stderr: bool = False) -> None:
    """The fleet table on the terminal, fitted to its width; the Markdown text where rich is not installed.

    stderr=True keeps stdout clean, as inside a `pyinfra --json` run.
    """
    try:
        from rich.console import Console
    except ImportError:
        print(render_markdown(summary), end="", file=sys.stderr if stderr else sys.stdout)
        return
    from gpufleet.report_terminal import print_table

    print_table(summary, Console(stderr=stderr))
