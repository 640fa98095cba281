"""The local mirror layout pip reads, and the per-host change summary of a pyinfra --json run."""

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from gpufleet.mirror import build_simple_index, project_name
from gpufleet.runsummary import summarise


def _wheel(folder: Path, name: str, version: str) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    module = name.replace("-", "_")
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{module}/__init__.py", f"__version__ = '{version}'\n")
        dist = f"{module}-{version}.dist-info"
        whl.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{dist}/RECORD", "")
    return path


def test_project_names_are_normalised_like_pep_503():
    assert project_name("Foo_Bar-1.0-py3-none-any.whl") == "foo-bar"
    assert project_name("nvidia_ml_py-13.0-py3-none-any.whl") == "nvidia-ml-py"


def test_pip_installs_from_the_simple_index_over_file_url(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = _wheel(wheels, "gpufleet_probe", "1.2.3")
    index = tmp_path / "simple"
    assert build_simple_index(wheels, index) == ["gpufleet-probe"]
    page = (index / "gpufleet-probe" / "index.html").read_text()
    assert f"#sha256={hashlib.sha256(wheel.read_bytes()).hexdigest()}" in page
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--isolated", "--target", str(target),
         "--index-url", index.as_uri(), "gpufleet-probe==1.2.3"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (target / "gpufleet_probe" / "__init__.py").read_text() == "__version__ = '1.2.3'\n"


RUN = {
    "plan": [],
    "results": {
        "operations": [
            {"name": "Install torch", "success": ["ws01"], "no_change": ["ws02"], "error": []},
            {"name": "Run the smoke test", "success": [], "no_change": [], "error": ["ws02"]},
        ],
        "totals": {},
        "failed_hosts": ["ws02"],
    },
}


def test_summary_counts_changes_per_host():
    summary = summarise(RUN)
    assert (summary.changes("ws01"), summary.unchanged("ws01"), summary.errors("ws01")) == (["Install torch"], [], [])
    assert (summary.changes("ws02"), summary.unchanged("ws02"), summary.errors("ws02")) == (
        [], ["Install torch"], ["Run the smoke test"])
    assert summary.failed_hosts == ["ws02"]


def test_summary_of_a_dry_run_is_empty():
    summary = summarise(json.loads('{"plan": [], "results": null}'))
    assert summary.hosts == {} and summary.failed_hosts == []


def run_summary(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpufleet.cli", "run-summary", *args], input=stdin,
                          capture_output=True, text=True, check=False)


def test_run_summary_command_reads_a_file_or_stdin(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(RUN))
    expected = ("ws01: 1 changed, 0 unchanged, 0 failed\n    changed: Install torch\n"
                "ws02: 0 changed, 1 unchanged, 1 failed\n    error: Run the smoke test\nfailed hosts: ws02\n")
    for result in (run_summary(str(path)), run_summary(stdin=json.dumps(RUN)), run_summary("-", stdin=json.dumps(RUN))):
        assert (result.returncode, result.stdout, result.stderr) == (0, expected, "")


def test_run_summary_command_says_what_is_wrong_with_bad_input(tmp_path):
    for text, why in (("pyinfra: error: no inventory", "not JSON"), ("[1, 2]", "a JSON list"),
                      ('{"results": {"operations": [{"name": "x", "success": "ws01"}]}}', "'success' is not a list")):
        result = run_summary(stdin=text)
        assert result.returncode == 2 and result.stdout == "", result
        assert "stdin is not the output of `pyinfra --json`" in result.stderr and why in result.stderr
        assert "Traceback" not in result.stderr
    empty = run_summary(stdin="\n")
    assert empty.returncode == 1 and "stdin is empty" in empty.stderr
    missing = run_summary(str(tmp_path / "absent.json"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr
