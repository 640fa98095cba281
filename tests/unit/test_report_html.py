"""The HTML fleet report, opened in a real headless chromium (Debian's `chromium` package, installed when missing)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from matplotlib import image

from gpufleet import report, report_html
from tests.unit.test_report import FLEET, hosts_by_name
from tests.unit.test_report import two_runs  # noqa: F401 (a fixture)

IN_CI = os.environ.get("CI") == "true"
REFERENCE_SCREENSHOT = Path(__file__).resolve().parents[1] / "data" / "report" / "fleet-report.png"
# Every name resolves nowhere: the page must load without the network.
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND"


def _unavailable(reason: str) -> None:
    """Under CI a browser that cannot be had is a failure; elsewhere the test is skipped, saying why."""
    if IN_CI:
        pytest.fail(f"headless chromium is needed and {reason}")
    pytest.skip(f"headless chromium is needed and {reason}")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium binary; installed with apt-get (as root) on a machine that lacks it."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0:
        _unavailable("is not installed; installing it needs root (apt-get install -y chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    install = ["apt-get", *lock, "install", "-y", "--no-install-recommends", "chromium"]
    proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        # Stale package lists are the usual reason on a fresh machine.
        subprocess.run(["apt-get", *lock, "update"], env=env, capture_output=True, timeout=600, check=False)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1800, check=False)
    found = shutil.which("chromium")
    if proc.returncode != 0 or not found:
        _unavailable(f"`{' '.join(install)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return found




def browser(chromium: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", OFFLINE, *args],
                          capture_output=True, text=True, timeout=180, check=False)


class PageDom(HTMLParser):
    """What the test looks for in the DOM chromium built: element ids, and the hosts of the rung grid's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.grid_hosts: list[str] = []
        self.row_classes: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(a["id"])
        if tag == "tr" and a.get("data-host"):
            self.grid_hosts.append(a["data-host"])
            self.row_classes[a["data-host"]] = a.get("class") or ""


def loaded_dom(chromium: str, page: Path) -> PageDom:
    proc = browser(chromium, "--dump-dom", page.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "<h1>gpufleet smoke report</h1>" in proc.stdout, proc.stdout[:500]
    dom = PageDom()
    dom.feed(proc.stdout)
    return dom


@pytest.fixture()
def fleet_page(tmp_path: Path) -> Path:
    target = tmp_path / "fleet"
    shutil.copytree(FLEET, target)
    report.write_report(target)
    return target / report_html.HTML_NAME


def test_html_report_is_one_file_that_fetches_nothing(fleet_page: Path) -> None:
    text = fleet_page.read_text()
    assert "<script" not in text and "@import" not in text
    links = re.findall(r"(?:src|href)=\"([^\"]*)\"", text) + re.findall(r"url\(([^)]*)\)", text)
    assert links and all(link.startswith("#") for link in links), links  # matplotlib's clip paths, in the page


def test_html_report_loads_in_chromium_with_every_host_and_one_mark_per_host_and_shape(
        chromium: str, fleet_page: Path) -> None:
    dom = loaded_dom(chromium, fleet_page)
    summary = report.build_summary(fleet_page.parent)
    hosts = hosts_by_name(summary)
    assert dom.grid_hosts == sorted(hosts)
    assert dom.row_classes["ws04"] == "outlier"
    assert dom.row_classes["ws06"] == "failed" and dom.row_classes["ws01"] == "ok"
    marks: dict[str, set[tuple[str, str, str]]] = {}
    for element_id in dom.ids:
        impl, _, rest = element_id.partition("/")
        if impl in ("xformers", "sdpa", "naive", "seed"):
            set_name, shape, host = rest.split("/")
            marks.setdefault(impl, set()).add((set_name, shape, host))
    with_figures = ["h100-a", "ws01", "ws02", "ws03", "ws04", "ws05"]
    shapes = [(s["set"], s["shape"]) for s in hosts["ws01"]["shapes"]]
    assert len(shapes) == 10  # five seed shapes at 1 head, five at 16 heads
    expected = {(set_name, shape, host) for host in with_figures for set_name, shape in shapes}
    assert marks["xformers"] == expected
    assert marks["sdpa"] == expected
    assert sum(e.startswith("xformers/") for e in dom.ids) == len(expected)
    # The seed's 5090 D figures sit on the 5090 D and D v2 hosts' seed shapes only.
    assert marks["seed"] == {m for m in expected if m[0] == "seed" and m[2] != "h100-a"}
    # Naive attention is measured where its score matrix fits; the 16-head 1x16384 shape does not on a 5090 D.
    assert ("wide", "1x16384x16x64", "ws01") not in marks["naive"]
    assert ("seed", "2x1024x1x64", "ws01") in marks["naive"]
    assert "trend-chart" not in dom.ids


def test_html_report_shows_the_trend_of_the_kept_runs(chromium: str, two_runs: Path) -> None:
    report.write_report(two_runs / "latest")
    dom = loaded_dom(chromium, two_runs / "latest" / report_html.HTML_NAME)
    assert "trend-chart" in dom.ids
    points = {tuple(i.split("/")[1:]) for i in dom.ids if i.startswith("trend/")}
    assert points == {(h, run) for h in "abcd" for run in ("20261201T100000Z", "20261202T100000Z")}


def test_html_report_screenshot_shows_the_page(chromium: str, fleet_page: Path, tmp_path: Path) -> None:
    """Renders the page; GPUFLEET_UPDATE_REFERENCE=1 makes it the reviewed reference under tests/data/report."""
    shot = tmp_path / "fleet-report.png"
    proc = browser(chromium, "--hide-scrollbars", "--window-size=1400,2000", f"--screenshot={shot}",
                   fleet_page.as_uri())
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    pixels = image.imread(shot)
    assert pixels.shape[:2] == (2000, 1400)
    # Not a blank page: the chart's bar colour is there.
    bar = tuple(int(report_html.XFORMERS_COLOUR[i:i + 2], 16) / 255 for i in (1, 3, 5))
    assert ((abs(pixels[..., :3] - bar) < 0.02).all(axis=-1)).sum() > 10_000
    if os.environ.get("GPUFLEET_UPDATE_REFERENCE") == "1":
        shutil.copyfile(shot, REFERENCE_SCREENSHOT)
    assert REFERENCE_SCREENSHOT.exists(), "no reviewed screenshot: rerun with GPUFLEET_UPDATE_REFERENCE=1 and look"


def test_a_shape_that_could_not_be_measured_has_no_mark_and_breaks_nothing(tmp_path: Path) -> None:
    doc = json.loads((FLEET / "synthetic-ws01.json").read_text())
    broken = doc["figures"]["attention"][0]
    broken["xformers"] = {"error": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    broken["naive"] = {"skipped": "out of memory: ..."}
    (tmp_path / "ws01.json").write_text(json.dumps(doc))
    report.write_report(tmp_path)
    dom = PageDom()
    dom.feed((tmp_path / report_html.HTML_NAME).read_text())
    marks = [i for i in dom.ids if i.startswith("xformers/")]
    assert len(marks) == 9 and "xformers/seed/2x1024x1x64/ws01" not in marks
    assert "naive/seed/2x1024x1x64/ws01" not in dom.ids and "sdpa/seed/2x1024x1x64/ws01" in dom.ids
