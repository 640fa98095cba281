"""The fleet report as one self-contained HTML page: rung grid, attention chart, versions, trend of past runs.

Charts are drawn by matplotlib into inline SVG (no script, no font or stylesheet fetched). Every chart mark has an
id (matplotlib's gid) naming what it shows, so the page can be checked from its DOM:
`<impl>/<set>/<batch>x<seq>x<heads>x<head_dim>/<host>` for the attention marks (impl: xformers, sdpa, naive,
seed) and `trend/<host>/<run>` for the trend points.
"""

from __future__ import annotations

import html
import io
from datetime import datetime
from typing import Optional

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from gpufleet import report
from gpufleet.report_history import RUN_FORMAT

HTML_NAME = report.HTML_NAME
XFORMERS_COLOUR = "#3b6ea8"
OUTLIER_COLOUR = "#d1495b"
SEED_COLOUR = "#f0a202"
STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; }
#rungs { font-size: 0.85em; } #rungs th { vertical-align: bottom; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; }
td.num { text-align: right; } td.host, td.gpu, td.status { white-space: nowrap; }
td.pass { background: #d7f0d4; } td.fail { background: #f6c6cc; font-weight: bold; } td.skip { color: #999; }
tr.outlier td.host, tr.failed td.host { font-weight: bold; }
tr.outlier td.host { background: #fde7b0; } tr.failed td.host { background: #f6c6cc; }
.common { background: #f4f4f4; padding: 0.5em; display: inline-block; }
svg { max-width: 100%; height: auto; }
.note { color: #555; font-size: 0.9em; }
"""


def _e(value: object) -> str:
    return html.escape("-" if value is None else str(value))


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _rc(chart: str) -> dict:
    # Text stays text (no embedded glyphs); clip-path ids are stable from run to run and differ between charts.
    return {"svg.fonttype": "none", "svg.hashsalt": f"gpufleet-{chart}", "font.size": 9}


def chart_hosts(summary: dict) -> list[dict]:
    """The hosts that have attention figures, in report order."""
    return [h for h in summary["hosts"] if any(s["xformers"] is not None for s in h["shapes"])]


def chart_panels(hosts: list[dict]) -> list[tuple[str, str, str]]:
    """(set, shape, title) for every shape measured, seed set first, in measuring order."""
    panels: list[tuple[str, str, str]] = []
    for h in hosts:
        for s in h["shapes"]:
            if (s["set"], s["shape"], ) not in [(p[0], p[1]) for p in panels]:
                heads = f"{s['heads']} head" + ("s" if s["heads"] != 1 else "")
                panels.append((s["set"], s["shape"], f"{s['batch']}x{s['seq']}, d{s['head_dim']}, {heads}"))
    return sorted(panels, key=lambda p: p[0] != "seed")


def attention_chart(summary: dict) -> Optional[str]:
    """Per shape, one row per host: xformers bar (red for an outlier host), SDPA tick, naive dot, seed diamond."""
    import matplotlib

    hosts = chart_hosts(summary)
    if not hosts:
        return None
    panels = chart_panels(hosts)
    sets = list(dict.fromkeys(p[0] for p in panels))
    ncols = max(sum(p[0] == s for p in panels) for s in sets)
    with matplotlib.rc_context(_rc("attention")):
        fig = Figure(figsize=(2.6 * ncols + 1.5, len(sets) * (0.32 * len(hosts) + 1.0) + 0.8))
        axes = fig.subplots(len(sets), ncols, squeeze=False, sharey=True)
        ys = {h["host"]: i for i, h in enumerate(reversed(hosts))}
        for row, set_name in enumerate(sets):
            for col, (_, shape, title) in enumerate(p for p in panels if p[0] == set_name):
                ax = axes[row][col]
                ax.set_title(title)
                for h in hosts:
                    s = next((s for s in h["shapes"] if s["set"] == set_name and s["shape"] == shape), None)
                    if s is None:
                        continue
                    y = ys[h["host"]]
                    mark = f"{set_name}/{shape}/{h['host']}"
                    colour = OUTLIER_COLOUR if h["flagged_slow"] else XFORMERS_COLOUR
                    if s["xformers"] is not None:
                        ax.barh([y], [s["xformers"]], height=0.6, color=colour)[0].set_gid(f"xformers/{mark}")
                    if s["sdpa"] is not None:
                        ax.plot([s["sdpa"]], [y], "|", color="black", ms=11, mew=2)[0].set_gid(f"sdpa/{mark}")
                    if s["naive"] is not None:
                        ax.plot([s["naive"]], [y], "o", color="#888", ms=4)[0].set_gid(f"naive/{mark}")
                    if s["seed"] is not None:
                        ax.plot([s["seed"]], [y], "D", color=SEED_COLOUR, mec="black", ms=6)[0].set_gid(f"seed/{mark}")
                ax.set_xlim(left=0)
                ax.grid(axis="x", alpha=0.3)
                if row == len(sets) - 1:
                    ax.set_xlabel("TFLOP/s")
            for col in range(sum(p[0] == set_name for p in panels), ncols):
                axes[row][col].set_visible(False)
            axes[row][0].set_ylabel(f"{set_name} shapes")
        axes[0][0].set_yticks(list(ys.values()), [h for h in ys])
        slow = {h["host"] for h in hosts if h["flagged_slow"]}
        for row in range(len(sets)):
            for label in axes[row][0].get_yticklabels():
                if label.get_text() in slow:
                    label.set_color(OUTLIER_COLOUR)
                    label.set_fontweight("bold")
        handles = [Patch(color=XFORMERS_COLOUR, label="xformers"),
                   Patch(color=OUTLIER_COLOUR, label="xformers, outlier host"),
                   Line2D([], [], ls="none", marker="|", color="black", ms=11, mew=2, label="SDPA"),
                   Line2D([], [], ls="none", marker="o", color="#888", ms=4, label="naive"),
                   Line2D([], [], ls="none", marker="D", color=SEED_COLOUR, mec="black", ms=6,
                          label="seed document's RTX 5090 D")]
        fig.legend(handles=handles, loc="upper center", ncols=len(handles), frameon=False,
                   bbox_to_anchor=(0.5, 1.0))
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        return _svg(fig)


def trend_chart(trend: list[tuple[str, dict[str, float]]]) -> Optional[str]:
    """Headline xformers TFLOP/s of each host over the last runs; one line per host, one point per run."""
    import matplotlib

    hosts = sorted({host for _, values in trend for host in values})
    if not hosts:
        return None
    with matplotlib.rc_context(_rc("trend")):
        fig = Figure(figsize=(9, 3.6))
        ax = fig.subplots()
        for host in hosts:
            points = [(i, values[host]) for i, (_, values) in enumerate(trend) if host in values]
            (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], "-", label=host)
            for (i, value) in points:
                ax.plot([i], [value], "o", color=line.get_color(), ms=5)[0].set_gid(f"trend/{host}/{trend[i][0]}")
        labels = [datetime.strptime(run, RUN_FORMAT).strftime("%Y-%m-%d %H:%M") for run, _ in trend]
        ax.set_xticks(range(len(trend)), labels, rotation=30, ha="right")
        ax.set_xlabel("run start (UTC)")
        ax.set_ylabel("attn TFLOP/s (xformers, 16 heads)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        fig.tight_layout()
        return _svg(fig)


def _versions_section(summary: dict) -> list[str]:
    from gpufleet.report_terminal import VERSION_FIELDS, versions

    v = versions(summary["hosts"])
    out = ["<h2>Versions</h2>"]
    if v.common:
        who = "Same on every host that reports it" if v.some_missing else "Same on every host"
        out.append(f'<p class="common">{who}: ' + ", ".join(f"{_e(k)} <b>{_e(val)}</b>" for k, val in v.common.items())
                   + "</p>")
    out.append('<table id="versions"><tr><th>host</th><th>GPU</th>'
               + "".join(f"<th>{label}</th>" for _, label in VERSION_FIELDS) + "<th>sm code</th></tr>")
    for h in summary["hosts"]:
        out.append(f'<tr><td class="host">{_e(h["host"])}</td><td class="gpu">{_e(h["gpu_short"])}</td>'
                   + "".join(f"<td>{_e(h[key])}</td>" for key, _ in VERSION_FIELDS)
                   + f"<td>{_e(h['sm_code'])}</td></tr>")
    out.append("</table>")
    return out


def _status(h: dict) -> str:
    if h["status"] == "passed" and h["flagged_slow"]:
        return f"SLOW: {h['below_median_pct']:.0f}% below median"
    if h["status"] == "passed":
        return "ok"
    return "UNREADABLE" if h["status"] == "unreadable" else f"FAILED at {h['failed_rung'] or '?'}"


def _row_class(h: dict) -> str:
    return "failed" if h["status"] != "passed" else ("outlier" if h["flagged_slow"] else "ok")


def _grid_section(summary: dict) -> list[str]:
    rungs: list[tuple[str, str]] = []
    for h in summary["hosts"]:
        for r in h["rungs"]:
            if r["id"] not in [x[0] for x in rungs]:
                rungs.append((r["id"], r["title"]))
    out = ["<h2>Smoke test rungs</h2>", '<table id="rungs"><tr><th>host</th><th>GPU</th>'
           + "".join(f'<th title="{_e(title)}">{_e(rid).replace("_", "_<wbr>")}</th>' for rid, title in rungs)
           + "<th>attn TFLOP/s</th><th>vs SDPA (x)</th><th>vs seed (x)</th><th>status</th></tr>"]
    for h in summary["hosts"]:
        by_id = {r["id"]: r for r in h["rungs"]}
        cells = []
        for rid, _ in rungs:
            r = by_id.get(rid)
            state = r["state"] if r else "skip"
            cells.append(f'<td class="{state}" title="{_e(r["message"] if r else "")}">{state}</td>')
        num = lambda v, fmt: f'<td class="num">{"-" if v is None else format(v, fmt)}</td>'  # noqa: E731
        out.append(f'<tr class="{_row_class(h)}" data-host="{_e(h["host"])}"><td class="host">{_e(h["host"])}'
                   + ("*" if h["synthetic"] else "") + f"</td><td class=\"gpu\">{_e(h['gpu_short'])}</td>"
                   + "".join(cells) + num(h["attention_tflops"], ".1f") + num(h["vs_sdpa"], ".2f")
                   + num(h["vs_seed"], ".2f")
                   + f'<td class="status" title="{_e(h["status_text"])}">{_e(_status(h))}</td></tr>')
    out.append("</table>")
    problems = report.problem_rows(summary)
    if problems:
        out.append('<ul id="failures">' + "".join(
            f"<li><b>{_e(host)}</b> failed at <code>{_e(where)}</code>: {_e(message)}</li>"
            for host, where, message in problems) + "</ul>")
    return out


def render_html(summary: dict, trend: Optional[list[tuple[str, dict[str, float]]]] = None,
                render_key: Optional[str] = None) -> str:
    c = summary["counts"]
    finished = sorted(h["finished_at"] for h in summary["hosts"] if h["finished_at"])
    key = [f'<meta name="gpufleet-report-key" content="{render_key}">'] if render_key else []
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', *key, "<title>gpufleet smoke report</title>",
           f"<style>{STYLE}</style></head><body>", "<h1>gpufleet smoke report</h1>",
           f'<p id="counts">{c["hosts"]} hosts: {c["passed"]} passed, {c["failed"]} failed, {c["flagged_slow"]} '
           f'flagged slow (more than {summary["outlier_fraction"]:.0%} below the median of their GPU model).'
           + (f" Last result: {_e(finished[-1])}." if finished else "") + "</p>"]
    out += _grid_section(summary)
    chart = attention_chart(summary)
    if chart:
        out += ["<h2>Attention throughput per host and shape</h2>",
                '<p class="note">fp16 forward. Bars: xformers memory_efficient_attention (red: a host more than '
                f'{summary["outlier_fraction"]:.0%} below its GPU model\'s median); tick: torch SDPA; dot: naive '
                "attention (absent where its score matrix would not fit); diamond: the seed document's published "
                "RTX 5090 D figure, on the hosts with that GPU (seed shapes only; its head count is not stated).</p>",
                f'<div id="attention-chart">{chart}</div>']
    out += _versions_section(summary)
    if trend:
        chart = trend_chart(trend)
        if chart:
            out += [f"<h2>Trend of the last {len(trend)} runs</h2>",
                    '<p class="note">Mean xformers TFLOP/s over the 16-head shapes, per run kept under the report '
                    "history; a run holds the hosts whose smoke test ran in it.</p>",
                    f'<div id="trend-chart">{chart}</div>']
    if any(h["synthetic"] for h in summary["hosts"]):
        out.append('<p class="note">* synthetic: a made-up document, used in tests.</p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"
