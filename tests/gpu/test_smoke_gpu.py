"""The smoke script on a real GPU: every rung passes and the figures are filled in.

Runs with the first Python whose torch sees a GPU, from: $GPUFLEET_SMOKE_PYTHON, the `venv_path` of the inventory
($GPUFLEET_INVENTORY, else inventory/hosts.yaml and inventory/examples/*.yaml) and the default setting, then any venv
under /opt, /srv, /root or /home, then this interpreter, and the first with xformers beside it. Skipped only where no
NVIDIA driver answers; with a driver and no such Python (a GPU host not yet provisioned), the test fails naming where
it looked and the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gpufleet.settings import load_settings

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "files" / "smoke" / "gpufleet_smoke.py"
WSL_NVIDIA_SMI = "/usr/lib/wsl/lib/nvidia-smi"


def _venv_paths_in(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "venv_path" and isinstance(value, str):
                yield value
            else:
                yield from _venv_paths_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from _venv_paths_in(item)


def candidate_pythons() -> list[str]:
    """Interpreters to try, in the order the module docstring gives."""
    found: list[str] = []
    if os.environ.get("GPUFLEET_SMOKE_PYTHON"):
        found.append(os.environ["GPUFLEET_SMOKE_PYTHON"])
    inventories = ([Path(os.environ["GPUFLEET_INVENTORY"])] if os.environ.get("GPUFLEET_INVENTORY") else
                   [ROOT / "inventory" / "hosts.yaml", *sorted((ROOT / "inventory" / "examples").glob("*.yaml"))])
    for inventory in inventories:
        try:
            found += [f"{venv}/bin/python" for venv in _venv_paths_in(yaml.safe_load(inventory.read_text()))]
        except (OSError, yaml.YAMLError):
            continue
    found.append(f"{load_settings()['venv_path'].default}/bin/python")
    for pattern in ("/opt/*/bin/python", "/opt/*/*/bin/python", "/srv/*/bin/python", "/srv/*/*/bin/python",
                    "/root/*/bin/python", "/root/.*/bin/python", "/home/*/*/bin/python", "/home/*/.*/bin/python"):
        found += sorted(str(path) for path in Path("/").glob(pattern.lstrip("/")))
    found.append(sys.executable)
    return list(dict.fromkeys(path for path in found if os.access(path, os.X_OK)))


def torch_sees_a_gpu(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True,
                           text=True, timeout=300, check=False)
    return probe.returncode == 0 and probe.stdout.strip().splitlines()[-1:] == ["True"]


def has_xformers(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import xformers"], capture_output=True, timeout=300, check=False)
    return probe.returncode == 0


def gpu_python() -> str:
    """The interpreter to run the smoke script with: skips where no driver answers; fails, naming the fix, where
    no torch sees the GPU or none has xformers beside it (a GPU host gpufleet has not provisioned)."""
    if not (shutil.which("nvidia-smi") or os.access(WSL_NVIDIA_SMI, os.X_OK)):
        pytest.skip(f"no NVIDIA driver: nvidia-smi is neither on PATH nor at {WSL_NVIDIA_SMI}")
    tried = candidate_pythons()
    seeing = [python for python in tried if torch_sees_a_gpu(python)]
    for python in seeing:
        if has_xformers(python):
            return python
    if seeing:
        pytest.fail(f"this GPU host is not provisioned: torch sees the GPU from {', '.join(seeing)}, but none of "
                    "them has xformers. Provision it first (pyinfra inventory.py deploys/full.py, or "
                    "scripts/gpu-e2e.sh), or set GPUFLEET_SMOKE_PYTHON to the provisioned venv's python.")
    pytest.fail("an NVIDIA driver answers, but no Python here has a torch that sees a GPU; tried "
                + ", ".join(tried) + ". Set GPUFLEET_SMOKE_PYTHON to the GPU venv's python.")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, str]:
    python = gpu_python()
    out = tmp_path_factory.mktemp("smoke") / "smoke.json"
    proc = subprocess.run([python, str(SCRIPT), "--quick", "--output", str(out)], capture_output=True, text=True,
                          timeout=1800, check=False)
    return proc.returncode, json.loads(out.read_text()), proc.stderr


def test_every_rung_passes_on_a_provisioned_gpu(smoke_run: tuple[int, dict, str]) -> None:
    rc, doc, stderr = smoke_run
    failed = [f"{r['id']}: {r['message']}" for r in doc["rungs"] if r["status"] != "passed"]
    assert rc == 0 and not failed, f"{failed}\n{stderr[-3000:]}"
    assert doc["status"] == "passed"


def test_attention_is_checked_in_every_dtype_and_fp32_takes_cutlass(smoke_run: tuple[int, dict, str]) -> None:
    attention = next(r for r in smoke_run[1]["rungs"] if r["id"] == "attention")
    dtypes = attention["details"]["dtypes"]
    assert set(dtypes) == {"float16", "bfloat16", "float32"}
    # fp32 is the input FA2 cannot take: the patched cutlass cap is what lets it run on sm_120.
    assert dtypes["float32"]["op_fw"].startswith("cutlassF")
    for entry in dtypes.values():
        assert max(entry["relative_error"].values()) <= entry["tolerance"]


def test_sass_for_this_gpu_is_proven_with_ptx_jit_disabled(smoke_run: tuple[int, dict, str]) -> None:
    sass = next(r for r in smoke_run[1]["rungs"] if r["id"] == "sp24_sass")
    assert sass["details"]["sass_proven"] is True
    assert sass["details"]["kept_values_match_input"] is True


def test_throughput_has_xformers_sdpa_and_naive_side_by_side(smoke_run: tuple[int, dict, str]) -> None:
    figures = smoke_run[1]["figures"]
    assert figures["gemm"]["tflops"] > 0
    assert len(figures["attention"]) == 10
    for entry in figures["attention"]:
        assert entry["xformers"]["tflops"] > 0 and entry["sdpa"]["tflops"] > 0
        assert entry["xformers"]["peak_mem_mib"] > 0
        assert "tflops" in entry["naive"] or entry["naive"]["skipped"].startswith("skipped: the ")
