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


def test_summary_counts_changes_per_host():
    document = {
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
    summary = summarise(document)
    assert summary["ws01"] == {"changed": ["Install torch"], "no_change": [], "error": []}
    assert summary["ws02"] == {"changed": [], "no_change": ["Install torch"], "error": ["Run the smoke test"]}


def test_summary_of_a_dry_run_is_empty():
    assert summarise(json.loads('{"plan": [], "results": null}')) == {}
