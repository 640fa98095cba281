"""The fleet report over recorded smoke documents (tests/data/smoke/fleet; see its README for which are synthetic)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpufleet import cli, report, report_history, report_html
from tests.conftest import run_pyinfra

DATA = Path(__file__).resolve().parents[1] / "data" / "smoke"
FLEET = DATA / "fleet"


def load_fixture_maker():
    spec = importlib.util.spec_from_file_location("make_fixtures", DATA / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def fleet_dir(tmp_path: Path) -> Path:
    target = tmp_path / "fleet"
    shutil.copytree(FLEET, target)
    return target


@pytest.fixture(scope="module")
def summary() -> dict:
    return report.build_summary(FLEET)


def hosts_by_name(summary: dict) -> dict:
    return {h["host"]: h for h in summary["hosts"]}


def write_5090_fleet(directory: Path, scales: dict[str, float]) -> None:
    """RTX 5090 D hosts whose attention speed is `scale` times the same baseline, via the fixture maker."""
    maker = load_fixture_maker()
    smoke = maker.load_script()
    gpu = maker.gpu_info("NVIDIA GeForce RTX 5090 D", "2B87", "12.0", "580.95.05", 575.0, 32607)
    seed = dict(report.SEED_REFERENCE_TOK_S)
    directory.mkdir(parents=True, exist_ok=True)
    for host, scale in scales.items():
        doc = maker.synthetic_doc(smoke, host, gpu, torch_version="2.12.0.dev20260407+cu128", scale=scale,
                                  gemm_tflops=209.5, seed_tok_s=seed, wide_tflops=100.0, vs_sdpa=0.62)
        (directory / f"{host}.json").write_text(json.dumps(doc))


def test_fleet_median_is_taken_per_gpu_model_in_a_mixed_fleet(summary: dict) -> None:
    hosts = hosts_by_name(summary)
    # ws01-ws04 are the passed 5090 D hosts: median of 130.0, 126.1, 132.6, 97.5.
    for name in ("ws01", "ws02", "ws03", "ws04"):
        assert hosts[name]["model_median_tflops"] == pytest.approx((126.1 + 130.0) / 2, abs=0.05)
    assert hosts["h100-a"]["model_median_tflops"] == hosts["h100-a"]["attention_tflops"]
    assert hosts["ws05"]["model_median_tflops"] == hosts["ws05"]["attention_tflops"]


def test_host_more_than_15_percent_below_its_model_median_is_flagged(summary: dict) -> None:
    hosts = hosts_by_name(summary)
    assert hosts["ws04"]["flagged_slow"]
    assert hosts["ws04"]["status_text"].startswith("SLOW: 24% below the NVIDIA GeForce RTX 5090 D median")
    assert [h["host"] for h in summary["hosts"] if h["flagged_slow"]] == ["ws04"]
    assert summary["counts"]["flagged_slow"] == 1


@pytest.mark.parametrize(("slow_scale", "flagged"), [(0.86, False), (0.84, True)])
def test_outlier_threshold_is_15_percent_below_the_median(tmp_path: Path, slow_scale: float, flagged: bool) -> None:
    write_5090_fleet(tmp_path, {"a": 1.0, "b": 1.0, "c": 1.0, "slow": slow_scale})
    hosts = hosts_by_name(report.build_summary(tmp_path))
    assert hosts["slow"]["flagged_slow"] is flagged
    assert not any(hosts[n]["flagged_slow"] for n in "abc")


def test_a_gpu_model_alone_in_the_fleet_is_never_flagged(summary: dict) -> None:
    hosts = hosts_by_name(summary)
    # The H100 is three times the 5090 D speed and the 5090 D v2 slower than the 5090 D median: other models.
    assert not hosts["h100-a"]["flagged_slow"]
    assert not hosts["ws05"]["flagged_slow"]
    assert hosts["ws05"]["attention_tflops"] < 0.95 * hosts["ws01"]["model_median_tflops"]


def test_failed_hosts_show_their_failed_rung_and_its_message(summary: dict) -> None:
    hosts = hosts_by_name(summary)
    driver = hosts["cpu-box-no-driver"]
    assert driver["status"] == "failed"
    assert driver["failed_rung"] == "driver"
    assert driver["status_text"] == "FAILED at driver"
    assert "nvidia-smi is neither on PATH nor at /usr/lib/wsl/lib/nvidia-smi" in driver["message"]
    torch_row = hosts["cpu-box-standin-h100"]
    assert torch_row["failed_rung"] == "torch_cuda"
    assert "is a build without CUDA" in torch_row["message"]
    assert torch_row["gpu"] == "NVIDIA H100 80GB HBM3"
    assert hosts["ws06"]["failed_rung"] == "sp24_sass"
    assert hosts["ws06"]["sm_code"] == "no sm_120"
    assert summary["counts"] == {"hosts": 9, "passed": 6, "failed": 3, "flagged_slow": 1}


def test_failed_hosts_take_no_part_in_the_median(summary: dict) -> None:
    hosts = hosts_by_name(summary)
    assert hosts["ws06"]["model_median_tflops"] is None
    assert hosts["ws06"]["attention_tflops"] is None
    assert not hosts["ws06"]["flagged_slow"]


def test_sm_code_column_says_what_the_sass_rung_proved(summary: dict) -> None:
    hosts = hosts_by_name(summary)
    assert hosts["ws01"]["sm_code"] == "sm_120"
    assert hosts["h100-a"]["sm_code"] == "sm_90"
    assert hosts["cpu-box-no-driver"]["sm_code"] is None


def test_seed_reference_applies_only_to_rtx_5090_d_models(summary: dict) -> None:
    hosts = hosts_by_name(summary)
    assert hosts["ws01"]["vs_seed"] == pytest.approx(1.0, abs=0.01)
    assert hosts["ws04"]["vs_seed"] == pytest.approx(0.75, abs=0.01)
    assert hosts["ws05"]["vs_seed"] == pytest.approx(0.9, abs=0.01)
    assert hosts["h100-a"]["vs_seed"] is None
    seed_table = report.seed_rows(summary)
    assert [row[0] for row in seed_table] == ["ws01", "ws02", "ws03", "ws04", "ws05", "seed RTX 5090 D (published)"]
    assert seed_table[-1][1:] == ["19.9M", "46.4M", "60.4M", "61.1M", "42.0M"]


def test_headline_is_the_mean_over_the_16_head_shapes(summary: dict) -> None:
    doc = json.loads((FLEET / "synthetic-h100-a.json").read_text())
    wide = [e for e in doc["figures"]["attention"] if e["heads"] == 16]
    tflops, vs_sdpa = report.headline(doc["figures"])
    assert tflops == pytest.approx(sum(e["xformers"]["tflops"] for e in wide) / len(wide), abs=0.01)
    assert vs_sdpa == pytest.approx(0.62, abs=0.005)


def test_report_writes_markdown_json_and_html_into_the_directory(fleet_dir: Path) -> None:
    summary = report.write_report(fleet_dir)
    written = json.loads((fleet_dir / report.JSON_NAME).read_text())
    assert written["counts"] == summary["counts"]
    assert (fleet_dir / report_html.HTML_NAME).read_text().startswith("<!DOCTYPE html>")
    markdown = (fleet_dir / report.MARKDOWN_NAME).read_text()
    assert "| ws04 (synthetic) |" in markdown and "SLOW: 24% below" in markdown
    assert "| seed RTX 5090 D (published) | 19.9M | 46.4M | 60.4M | 61.1M | 42.0M |" in markdown
    assert "- **cpu-box-standin-h100** (torch_cuda): torch 2.13.0+cpu is a build without CUDA" in markdown


def test_running_the_report_twice_ignores_its_own_summary(fleet_dir: Path) -> None:
    first = report.write_report(fleet_dir)
    second = report.write_report(fleet_dir)
    assert first["counts"] == second["counts"]


def test_the_html_page_is_drawn_again_only_when_its_inputs_change(fleet_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    report.write_report(fleet_dir)
    page = fleet_dir / report.HTML_NAME
    drawn = page.read_text()
    drawings = []
    real_render = report_html.render_html
    monkeypatch.setattr(report_html, "render_html", lambda *a, **k: drawings.append(a) or real_render(*a, **k))
    report.write_report(fleet_dir)
    assert drawings == [] and page.read_text() == drawn
    doc = json.loads((fleet_dir / "synthetic-ws01.json").read_text())
    doc["host"] = "ws07"
    (fleet_dir / "synthetic-ws07.json").write_text(json.dumps(doc))
    report.write_report(fleet_dir)
    assert len(drawings) == 1 and "ws07" in page.read_text()
    page.write_text("edited by hand\n")
    report.write_report(fleet_dir)
    assert len(drawings) == 2 and page.read_text().startswith("<!DOCTYPE html>")


def test_the_latest_document_of_a_host_wins(tmp_path: Path) -> None:
    older = json.loads((FLEET / "synthetic-ws06-no-sm120.json").read_text())
    newer = json.loads((FLEET / "synthetic-ws01.json").read_text())
    older["host"] = newer["host"] = "ws-rerun"
    older["finished_at"], newer["finished_at"] = "2026-11-27T10:00:00+00:00", "2026-11-27T11:00:00+00:00"
    (tmp_path / "b-older.json").write_text(json.dumps(older))
    (tmp_path / "a-newer.json").write_text(json.dumps(newer))
    summary = report.build_summary(tmp_path)
    assert [h["status"] for h in summary["hosts"]] == ["passed"]
    assert summary["superseded_files"] == ["b-older.json"]


def test_unreadable_and_foreign_files_do_not_stop_the_report(tmp_path: Path) -> None:
    shutil.copy(FLEET / "synthetic-ws01.json", tmp_path)
    (tmp_path / "broken.json").write_text('{"schema_version": 1, "tool": "gpufleet_sm')
    (tmp_path / "inventory-dump.json").write_text('{"hosts": []}')
    future = json.loads((FLEET / "synthetic-ws02.json").read_text())
    future["schema_version"] = 99
    (tmp_path / "future.json").write_text(json.dumps(future))
    hosts = hosts_by_name(report.build_summary(tmp_path))
    assert set(hosts) == {"ws01", "broken", "ws02"}
    assert hosts["broken"]["status_text"] == "UNREADABLE"
    assert "broken.json is not valid JSON" in hosts["broken"]["message"]
    assert "schema_version 99" in hosts["ws02"]["message"]


def test_report_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_5090_fleet(tmp_path / "good", {"a": 1.0, "b": 0.99})
    assert cli.main(["report", str(tmp_path / "good")]) == 0
    shutil.copy(FLEET / "real-cpu-no-driver.json", tmp_path / "good")
    assert cli.main(["report", str(tmp_path / "good")]) == 1
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "no smoke documents" in err and "is not a directory" in err


def test_report_command_prints_the_fleet_table(fleet_dir: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    cli.main(["report", str(fleet_dir)])
    out = capsys.readouterr().out
    assert "gpufleet smoke report" in out
    assert "cpu-box-standin-h100 failed at torch_cuda" in out
    assert "cpu-box-no-driver failed at driver: no NVIDIA driver answered" in " ".join(out.split())


def write_run(directory: Path, hosts: dict[str, tuple[float, str, str]]) -> None:
    """RTX 5090 D hosts as {host: (speed scale, driver, torch)}, via the fixture maker."""
    maker = load_fixture_maker()
    smoke = maker.load_script()
    directory.mkdir(parents=True, exist_ok=True)
    for host, (scale, driver, torch_version) in hosts.items():
        gpu = maker.gpu_info("NVIDIA GeForce RTX 5090 D", "2B87", "12.0", driver, 575.0, 32607)
        doc = maker.synthetic_doc(smoke, host, gpu, torch_version=torch_version, scale=scale, gemm_tflops=209.5,
                                  seed_tok_s=dict(report.SEED_REFERENCE_TOK_S), wide_tflops=100.0, vs_sdpa=0.62)
        (directory / f"{host}.json").write_text(json.dumps(doc))


def report_output(directory: Path, columns: int, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                  *extra: str) -> tuple[int, list[str]]:
    monkeypatch.setenv("COLUMNS", str(columns))
    code = cli.main(["report", str(directory), *extra])
    return code, capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("columns", [80, 120, 200])
def test_terminal_table_fits_the_width_and_keeps_host_names_whole(
        fleet_dir: Path, columns: int, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    code, lines = report_output(fleet_dir, columns, capsys, monkeypatch)
    assert code == 1
    assert max(len(line) for line in lines) <= columns, "\n".join(lines)
    for host in hosts_by_name(report.build_summary(fleet_dir)):
        # A table row starts with the whole name (a synthetic host's carries a *).
        assert any(re.match(rf"{re.escape(host)}\*? ", line) for line in lines), (host, lines)


def test_at_80_columns_shared_versions_head_the_table_and_differing_ones_get_stack_letters(
        fleet_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    _, lines = report_output(fleet_dir, 80, capsys, monkeypatch)
    assert lines[:2] == ["9 hosts: 6 passed, 3 failed, 1 slow. Same on every host that reports it:", "xformers 0.0.35"]
    header = next(line for line in lines if line.startswith("host "))
    assert header.split() == ["host", "GPU", "stack", "TFLOP/s", "SDPA", "seed", "status"]
    ws01 = next(line for line in lines if line.startswith("ws01*"))
    assert ws01.split()[:5] == ["ws01*", "RTX", "5090", "D", "D"]
    assert "stack D: driver 580.95.05, CUDA 12.8.93, torch 2.12.0.dev20260407+cu128" in lines
    assert "stack A: driver none, CUDA none, torch 2.13.0+cpu" in lines
    assert next(line for line in lines if line.startswith("ws04*")).endswith("SLOW -24%")


def test_at_120_columns_differing_versions_get_their_own_columns(
        fleet_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    _, lines = report_output(fleet_dir, 120, capsys, monkeypatch)
    header = next(line for line in lines if line.startswith("host "))
    assert header.split()[:5] == ["host", "GPU", "driver", "CUDA", "torch"]
    assert "xformers" not in header
    assert "2.12.0.dev20260407+cu128" in next(line for line in lines if line.startswith("ws01*"))
    assert not [line for line in lines if line.startswith("stack ")]


def test_a_fleet_on_one_stack_has_no_version_column(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    write_5090_fleet(tmp_path, {"a": 1.0, "b": 0.99})
    code, lines = report_output(tmp_path, 80, capsys, monkeypatch)
    assert code == 0
    assert lines[:2] == ["2 hosts: 2 passed, 0 failed, 0 slow. Same on every host:",
                         "driver 580.95.05, CUDA 12.8.93, torch 2.12.0.dev20260407+cu128, xformers 0.0.35"]
    header = next(line for line in lines if line.startswith("host "))
    assert header.split() == ["host", "GPU", "sm", "code", "TFLOP/s", "SDPA", "seed", "status"]


def test_at_200_columns_the_table_shows_per_shape_figures(fleet_dir: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _, lines = report_output(fleet_dir, 200, capsys, monkeypatch)
    shape_header = next(line for line in lines if "attn" in line and "2x1024" in line)
    assert [w for w in shape_header.split() if "x" in w and w[0].isdigit()] == [
        "2x1024", "2x2048", "1x4096", "1x8192", "1x16384"]
    h100 = next(line for line in lines if line.startswith("h100-a*")).split()
    assert h100.count("300.0") == 6  # the headline and the five 16-head shapes
    assert "seed RTX 5090 D (published)" in " ".join(lines)


def test_each_failed_or_slow_host_gets_one_line_below_the_table(
        fleet_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    _, lines = report_output(fleet_dir, 80, capsys, monkeypatch)
    failures = [line for line in lines if " failed at " in line]
    assert [line.split(" failed at ")[0] for line in failures] == ["cpu-box-no-driver", "cpu-box-standin-h100",
                                                                   "ws06"]
    assert failures[2].startswith("ws06 failed at sp24_sass: the sparsify24 probe exited 1")
    assert failures[2].endswith("…")
    assert "ws04 is 24% below the RTX 5090 D median of 128.05 TFLOP/s" in lines


def test_the_report_command_fits_80_columns_from_a_shell(fleet_dir: Path) -> None:
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "gpufleet.cli", "report", str(fleet_dir)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) > 15 and max(len(line) for line in lines) <= 80, proc.stdout
    assert "fleet-report.html" in proc.stderr and max(len(line) for line in proc.stderr.splitlines()) <= 80


@pytest.mark.parametrize(("name", "short"), [
    ("NVIDIA GeForce RTX 5090 D", "RTX 5090 D"), ("NVIDIA GeForce RTX 5090 D V2", "RTX 5090 D v2"),
    ("NVIDIA GeForce RTX 5090 D v2", "RTX 5090 D v2"), ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H200", "H200"),
    ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA A100-SXM4-80GB", "A100-SXM4"), (None, None)])
def test_gpu_names_are_shortened_the_way_people_say_them(name: str, short: str) -> None:
    assert report.short_gpu_name(name) == short


DRIVER_OLD, DRIVER_NEW = "580.95.05", "595.44.02"
TORCH = "2.12.0.dev20260407+cu128"


@pytest.fixture()
def two_runs(tmp_path: Path) -> Path:
    """reports/history with two runs and reports/latest holding the second: b got a new driver and is 20% slower,
    c is 20% slower on the same stack, d got a new driver and is 10% slower, a did not change."""
    reports = tmp_path / "reports"
    write_run(reports / "history" / "20261201T100000Z",
              {h: (1.0, DRIVER_OLD, TORCH) for h in "abcd"})
    second = {"a": (1.0, DRIVER_OLD, TORCH), "b": (0.8, DRIVER_NEW, TORCH), "c": (0.8, DRIVER_OLD, TORCH),
              "d": (0.9, DRIVER_NEW, TORCH)}
    write_run(reports / "history" / "20261202T100000Z", second)
    write_run(reports / "latest", second)
    return reports


def test_compare_flags_the_host_that_got_slower_after_a_driver_change(
        two_runs: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    previous = two_runs / "history" / "20261201T100000Z"
    code, lines = report_output(two_runs / "latest", 80, capsys, monkeypatch, "--compare", str(previous))
    assert code == 0
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    below = lines[lines.index(next(x for x in lines if "Change since" in x)):]
    rows = {h: next(line for line in below if line.startswith(f"{h} ")) for h in "abcd"}
    assert rows["b"].split()[1:] == ["100.0", "80.0", "-20%", "driver", "SLOWER", "after", "driver", "change"]
    assert rows["c"].split()[1:] == ["100.0", "80.0", "-20%", "-", "slower,", "same", "driver", "and", "torch"]
    assert rows["d"].split()[1:] == ["100.0", "90.0", "-10%", "driver"]
    assert rows["a"].split()[1:] == ["100.0", "100.0", "+0%", "-"]
    assert f"b driver: {DRIVER_OLD} -> {DRIVER_NEW}" in lines


def test_compare_flags_only_a_slowdown_after_a_driver_or_torch_change(two_runs: Path) -> None:
    changes = {c.host: c for c in report_history.compare(
        report.build_summary(two_runs / "latest"), report.build_summary(two_runs / "history" / "20261201T100000Z"))}
    assert [h for h, c in changes.items() if c.flagged] == ["b"]
    assert changes["b"].changed == {"driver": (DRIVER_OLD, DRIVER_NEW)}
    assert changes["b"].change_pct == pytest.approx(-20.0, abs=0.1)


def test_compare_lists_hosts_present_in_one_run_only(two_runs: Path) -> None:
    write_run(two_runs / "latest", {"e": (1.0, DRIVER_OLD, TORCH)})
    (two_runs / "latest" / "a.json").unlink()
    changes = {c.host: c for c in report_history.compare(
        report.build_summary(two_runs / "latest"), report.build_summary(two_runs / "history" / "20261201T100000Z"))}
    assert changes["e"].note == "new in this run" and changes["a"].note == "not in this run"
    assert not changes["e"].flagged and not changes["a"].flagged


def test_trend_reads_the_last_runs_of_the_history_oldest_first(two_runs: Path) -> None:
    (two_runs / "history" / "not-a-run").mkdir()
    runs = report_history.trend(two_runs / "history")
    assert [name for name, _ in runs] == ["20261201T100000Z", "20261202T100000Z"]
    assert runs[1][1] == pytest.approx({"a": 100.0, "b": 80.0, "c": 80.0, "d": 90.0}, abs=0.1)
    assert [name for name, _ in report_history.trend(two_runs / "history", last=1)] == ["20261202T100000Z"]


def test_compare_with_a_missing_directory_exits_2(two_runs: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["report", str(two_runs / "latest"), "--compare", str(two_runs / "nope")]) == 2
    assert "--compare" in capsys.readouterr().err


def test_a_run_is_compared_with_the_run_before_it_for_the_hosts_it_tested(two_runs: Path) -> None:
    history = two_runs / "history"
    assert report_history.since_previous_run(history, "20261201T100000Z") is None
    write_run(history / "20261203T100000Z", {"b": (1.0, DRIVER_NEW, TORCH)})
    previous, changes = report_history.since_previous_run(history, "20261203T100000Z")
    assert previous.name == "20261202T100000Z"
    assert [(c.host, c.change_pct, c.flagged) for c in changes] == [("b", 25.0, False)]
    previous, changes = report_history.since_previous_run(history, "20261202T100000Z")
    assert [c.host for c in changes if c.flagged] == ["b"]


LOCAL_RUN = '''
from pathlib import Path
from pyinfra.operations import python
from deploys.smoke import keep_in_history
from gpufleet.fleet_report import history_run_name, print_report_when_run_ends

reports = Path({reports!r})
fetched = Path({fetched!r})
# As deploys/smoke.py does after fetching a host's result: keep it in this run's history, report at the end.
python.call(name="Fetch", function=keep_in_history, src=fetched, dest=reports / "latest" / fetched.name)
python.call(name="Keep the smoke result in the report history", function=keep_in_history, src=fetched,
            dest=reports / "history" / history_run_name() / fetched.name, _if=lambda: {tested})
print_report_when_run_ends(reports / "latest")
'''


@pytest.mark.parametrize("tested", [True, False])
def test_a_real_pyinfra_run_keeps_its_results_and_says_what_got_slower(tmp_path: Path, tested: bool) -> None:
    """The real pyinfra CLI on this machine (@local, nothing but files in tmp_path): the smoke stage's history step
    and the end-of-run report, after b's driver changed and it got 20% slower."""
    reports = tmp_path / "reports"
    write_run(reports / "history" / "20261201T100000Z", {"a": (1.0, DRIVER_OLD, TORCH), "b": (1.0, DRIVER_OLD, TORCH)})
    write_run(reports / "latest", {"a": (1.0, DRIVER_OLD, TORCH)})
    write_run(tmp_path / "fetched", {"b": (0.8, DRIVER_NEW, TORCH)})
    deploy = tmp_path / "deploy.py"
    deploy.write_text(LOCAL_RUN.format(reports=str(reports), fetched=str(tmp_path / "fetched" / "b.json"),
                                       tested=tested))
    result = run_pyinfra("-y", "@local", str(deploy), env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    runs = report_history.run_dirs(reports / "history")
    output = result.stdout + result.stderr
    if tested:
        assert len(runs) == 2 and [p.name for p in runs[1].iterdir()] == ["b.json"]
        assert re.search(r"^b +100\.0 +80\.0 +-20% +driver +SLOWER after driver change$", output, re.M), output
    else:
        assert [p.name for p in runs] == ["20261201T100000Z"]
        assert "Change since" not in output
    assert (reports / "latest" / report_html.HTML_NAME).exists()
