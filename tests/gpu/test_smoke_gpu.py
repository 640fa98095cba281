"""The smoke script on a real GPU: every rung passes and the figures are filled in.

Runs with $GPUFLEET_SMOKE_PYTHON (a venv with CUDA torch and our xformers build), else this interpreter.
Skipped, saying why, where no NVIDIA driver answers or that interpreter's torch sees no GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "files" / "smoke" / "gpufleet_smoke.py"
PYTHON = os.environ.get("GPUFLEET_SMOKE_PYTHON", sys.executable)


def gpu_skip_reason() -> str | None:
    if not (shutil.which("nvidia-smi") or os.access("/usr/lib/wsl/lib/nvidia-smi", os.X_OK)):
        return "no NVIDIA driver here: nvidia-smi is neither on PATH nor at /usr/lib/wsl/lib/nvidia-smi"
    probe = subprocess.run([PYTHON, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True,
                           text=True, timeout=300, check=False)
    if probe.returncode != 0:
        return f"{PYTHON} cannot import torch (set GPUFLEET_SMOKE_PYTHON to the GPU venv's python)"
    if probe.stdout.strip().splitlines()[-1:] != ["True"]:
        return f"torch under {PYTHON} sees no GPU"
    return None


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, str]:
    reason = gpu_skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("smoke") / "smoke.json"
    proc = subprocess.run([PYTHON, str(SCRIPT), "--quick", "--output", str(out)], capture_output=True, text=True,
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
