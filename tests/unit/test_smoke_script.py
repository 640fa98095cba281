"""The host-side smoke script on this GPU-less machine: its parsing, its documents, and real runs that must fail
at the right rung.

The real runs need an interpreter with a CPU-only torch: $GPUFLEET_SMOKE_PYTHON, this interpreter if it has one, or
a venv made under /tmp with `pip install torch==2.13.0` (a CPU build from local disk here); where none can be had
(a GPU host without network), skipped saying so, and under CI=true failed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.conftest import cannot_run
from tests.host_scripts import cubins
from tests.smoke_standins import SCRIPT, STANDIN_NVCC, STANDIN_NVIDIA_SMI, load_script, system_bin_without

VENV = Path("/tmp/gpufleet-smoke-cpu-torch-venv")
TORCH_PIN = "torch==2.13.0"
PYPI_XFORMERS = Path("/tmp/gpufleet-smoke-pypi-xformers-0.0.35")



smoke = load_script()


def has_cpu_torch(python: str) -> bool:
    """A torch built without CUDA: the runs below must fail at the torch rung on any machine, GPU hosts too."""
    probe = subprocess.run([python, "-c", "import torch; assert torch.version.cuda is None"], capture_output=True,
                           timeout=120, check=False)
    return probe.returncode == 0


@pytest.fixture(scope="session")
def torch_python() -> str:
    # $GPUFLEET_SMOKE_PYTHON usually names a GPU venv (tests/gpu): used here only if its torch is a CPU build.
    for candidate in (os.environ.get("GPUFLEET_SMOKE_PYTHON"), sys.executable):
        if candidate and has_cpu_torch(candidate):
            return candidate
    python = str(VENV / "bin" / "python")
    if not (VENV / "bin" / "python").exists() or not has_cpu_torch(python):
        venv.create(VENV, with_pip=True, clear=True)
        install = subprocess.run([python, "-m", "pip", "install", "-q", TORCH_PIN], capture_output=True, text=True,
                                 timeout=900, check=False)
        if install.returncode != 0:
            cannot_run(f"no torch to run the smoke script with: `pip install {TORCH_PIN}` into {VENV} failed: "
                        f"{install.stderr.strip()[-300:]}")
    return python


@pytest.fixture(scope="session")
def pypi_xformers(torch_python: str) -> Path:
    """PyPI's official xformers 0.0.35 wheel unpacked into its own --target directory (no sm_120, other torch)."""
    if not (PYPI_XFORMERS / "xformers" / "_C.so").exists():
        install = subprocess.run([torch_python, "-m", "pip", "install", "-q", "--no-deps", "--target",
                                  str(PYPI_XFORMERS), "xformers==0.0.35"], capture_output=True, text=True,
                                 timeout=600, check=False)
        if install.returncode != 0:
            cannot_run(f"PyPI's xformers 0.0.35 wheel could not be installed: {install.stderr.strip()[-300:]}")
    return PYPI_XFORMERS


RUN_XFORMERS_RUNG = """
import argparse, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("gpufleet_smoke", sys.argv[1])
smoke = importlib.util.module_from_spec(spec)
spec.loader.exec_module(smoke)
doc = smoke.new_document("cpu-box", [])
try:
    print(json.dumps({"passed": smoke.rung_xformers_cpp(doc, argparse.Namespace(device=0))}))
except smoke.RungFailed as exc:
    print(json.dumps({"failed": str(exc), "details": smoke.rung_entry(doc, "xformers_cpp")["details"]}))
"""


def test_pypi_xformers_beside_another_torch_fails_the_cpp_rung(torch_python: str, pypi_xformers: Path) -> None:
    # The ladder cannot reach this rung without a GPU, so the rung's own function runs on the real wheel.
    env = dict(os.environ, PYTHONPATH=str(pypi_xformers))
    proc = subprocess.run([torch_python, "-c", RUN_XFORMERS_RUNG, str(SCRIPT)], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "cannot load its C++ part next to torch" in result["failed"]
    assert "xFormers was built for: PyTorch 2.10.0+cu128" in result["failed"]
    assert "Build xformers from source on this host" in result["failed"]
    assert result["details"]["xformers_file"].startswith(str(pypi_xformers))
    assert result["details"]["build"]["arch_list"] == "7.5 8.0+PTX 8.0 9.0a"


def standin_dir(tmp_path: Path, **scripts: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in scripts.items():
        path = bin_dir / name.replace("_", "-")
        path.write_text(text)
        path.chmod(0o755)
    return bin_dir


def run_script(python: str, tmp_path: Path, path_dirs: list[Path], *extra: str) -> tuple[int, dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = ":".join([str(d) for d in path_dirs] + [str(system_bin_without(tmp_path, "nvidia-smi", "nvcc"))])
    out = tmp_path / "smoke.json"
    proc = subprocess.run([python, str(SCRIPT), "--output", str(out), *extra], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    return proc.returncode, json.loads(out.read_text()), proc.stderr


def statuses(doc: dict) -> dict:
    return {r["id"]: r["status"] for r in doc["rungs"]}


def test_without_a_driver_the_script_fails_at_the_driver_rung(torch_python: str, tmp_path: Path) -> None:
    rc, doc, stderr = run_script(torch_python, tmp_path, [])
    assert rc == 1
    assert doc["schema_version"] == smoke.SCHEMA_VERSION
    assert doc["status"] == "failed" and doc["failed_rung"] == "driver"
    assert "no NVIDIA driver answered" in doc["message"]
    assert "nvidia-smi is neither on PATH nor at /usr/lib/wsl/lib/nvidia-smi" in doc["message"]
    assert statuses(doc) == {"driver": "failed", **{rid: "not_run" for rid, _ in smoke.RUNGS[1:]}}
    assert doc["versions"]["torch"].startswith("2.")
    assert doc["figures"] is None
    assert "rung 'driver'" in stderr


def test_cpu_torch_behind_a_driver_fails_at_the_torch_rung(torch_python: str, tmp_path: Path) -> None:
    real_nvcc = smoke.find_nvcc(None)[0]
    # This machine kind ships a real nvcc (CUDA 13.0); the stand-in serves only where it is missing.
    bin_dir = (standin_dir(tmp_path, nvidia_smi=STANDIN_NVIDIA_SMI) if real_nvcc else
               standin_dir(tmp_path, nvidia_smi=STANDIN_NVIDIA_SMI, nvcc=STANDIN_NVCC))
    nvcc_args = ["--nvcc", real_nvcc] if real_nvcc else []
    rc, doc, _ = run_script(torch_python, tmp_path, [bin_dir], *nvcc_args)
    assert rc == 1
    assert doc["failed_rung"] == "torch_cuda"
    assert statuses(doc)["driver"] == "passed" and statuses(doc)["cuda_toolkit"] == "passed"
    torch_rung = next(r for r in doc["rungs"] if r["id"] == "torch_cuda")
    assert "is a build without CUDA" in torch_rung["message"]
    assert "torch_index_url" in torch_rung["message"]
    assert doc["gpu"]["name"] == "NVIDIA H100 80GB HBM3"
    assert doc["gpu"]["pci_device_id"] == "2330"
    assert doc["gpu"]["pcie_link"] == {"gen": 5, "width": 16, "max_gen": 5, "max_width": 16}
    assert re.fullmatch(r"\d+\.\d+\.\d+", doc["versions"]["cuda_toolkit"])
    assert statuses(doc)["matmul"] == "not_run"


def test_a_hung_driver_query_is_stopped_by_the_watchdog(tmp_path: Path) -> None:
    bin_dir = standin_dir(tmp_path, nvidia_smi="#!/bin/sh\nexec sleep 120\n")
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin")
    out = tmp_path / "hung.json"
    # The driver rung needs only the standard library: -S leaves out site-packages, where NVML's binding would find
    # a GPU host's real GPU.
    proc = subprocess.run([sys.executable, "-S", str(SCRIPT), "--output", str(out), "--timeout", "3"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 3
    doc = json.loads(out.read_text())
    assert doc["failed_rung"] == "driver"
    assert "timed out" in doc["message"]


def test_without_output_the_document_goes_to_stdout(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=str(system_bin_without(tmp_path, "nvidia-smi", "nvcc")))
    # -S: no site-packages, so no NVML binding finds a GPU host's real GPU (the driver rung needs only stdlib).
    proc = subprocess.run([sys.executable, "-S", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["failed_rung"] == "driver"


def test_nvidia_smi_csv_is_parsed_with_device_id_split_from_vendor() -> None:
    line = "0, NVIDIA GeForce RTX 5090 D, 0x2B8710DE, 00000000:01:00.0, 12.0, 580.95.05, 1, 16, 5, 16, 575.00, 32607"
    (gpu,) = smoke.parse_nvidia_smi_csv(line + "\n", smoke.SMI_FIELDS)
    assert gpu["name"] == "NVIDIA GeForce RTX 5090 D"
    assert gpu["pci_device_id"] == "2B87"
    assert gpu["compute_capability"] == "12.0"
    assert gpu["pcie_link"] == {"gen": 1, "width": 16, "max_gen": 5, "max_width": 16}
    assert gpu["power_limit_w"] == 575.0 and gpu["memory_total_mib"] == 32607


def test_fields_wsl_does_not_report_become_null() -> None:
    line = "0, NVIDIA GeForce RTX 5090 D V2, 0x2B8C10DE, 00000000:2B:00.0, 12.0, 581.57, [N/A], [N/A], 5, 16, [N/A], 24463"
    (gpu,) = smoke.parse_nvidia_smi_csv(line, smoke.SMI_FIELDS)
    assert gpu["pci_device_id"] == "2B8C"
    assert gpu["pcie_link"]["gen"] is None and gpu["power_limit_w"] is None


def test_nvidia_smi_output_with_missing_fields_is_refused() -> None:
    with pytest.raises(ValueError, match="printed 3 fields where 5 were asked"):
        smoke.parse_nvidia_smi_csv("0, NVIDIA H100, 9.0", smoke.SMI_MINIMAL_FIELDS)


@pytest.mark.parametrize(("output", "fix"), [
    ("Failed to initialize NVML: Driver/library version mismatch", "reboot the host"),
    ("No devices were found", "open"),
    ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver", "lsmod"),
])
def test_known_driver_failures_come_with_their_fix(output: str, fix: str) -> None:
    assert fix in smoke.driver_hint(output)


def test_throughput_figure_arithmetic() -> None:
    # 1x8192x64, one head, in 134 us: the seed's 61.1M tok/s; FLOPs are 4*N*N*D per head.
    fig = smoke.make_figure(1, 8192, 1, 64, 8192 / 61.1e6, 2**20, 200.0, 50)
    assert fig["tok_per_s"] == pytest.approx(61.1e6)
    assert fig["tflops"] == pytest.approx(4 * 8192 * 8192 * 64 * 61.1e6 / 8192 / 1e12, rel=1e-3)
    assert fig["pct_of_gemm_peak"] == pytest.approx(100 * fig["tflops"] / 200.0, abs=0.1)
    assert fig["peak_mem_mib"] == 1.0


def test_document_names_the_first_failed_rung_and_skips_the_rest() -> None:
    doc = smoke.new_document("ws01", [])
    for rung in doc["rungs"][:4]:
        rung["status"] = "passed"
    doc["rungs"][4].update(status="failed", message="xformers 0.0.35 cannot load its C++ part")
    smoke.finish_document(doc)
    assert doc["status"] == "failed" and doc["failed_rung"] == "xformers_cpp"
    assert doc["message"].startswith("rung 'xformers_cpp' (xformers loads its C++ part) failed: xformers 0.0.35")
    assert doc["rungs"][5]["message"] == "not run: rung 'xformers_cpp' failed first"


def test_non_finite_errors_are_written_as_strict_json(tmp_path: Path) -> None:
    doc = smoke.new_document("ws01", [])
    doc["rungs"][5]["details"] = {"relative_error": {"out": float("inf"), "grad_q": float("nan")}}
    out = tmp_path / "doc.json"
    smoke.write_document(doc, str(out))
    text = out.read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text)["rungs"][5]["details"]["relative_error"] == {"out": "inf", "grad_q": "nan"}


def test_long_xformers_errors_keep_their_last_reason() -> None:
    # xformers lists every op's refusal; the cutlass cap on sm_120 comes last and is the one that matters.
    error = "No operator found for `memory_efficient_attention_forward` " + "x " * 800 + (
        "`cutlassF-pt` is not supported because: requires device with capability <= (9, 0) but your GPU has (12, 0)")
    short = smoke.squeeze(error, 600)
    assert len(short) <= 605
    assert short.startswith("No operator found")
    assert short.endswith("but your GPU has (12, 0)")



@pytest.mark.parametrize("fixture", ["sm90_sm120", "sm120a_sm120f_sm100f", "xformers-0.0.35-sm120-C.so"])
def test_cubins_of_xformers_are_read_by_the_builds_own_reader(tmp_path: Path, fixture: str) -> None:
    """The smoke test lists _C.so's cubins with files/xformers/cubins.py, the reader the build proves its wheel with:
    both give the same archs, in the same order."""
    listing = tmp_path / "listing.txt"
    listing.write_text((Path(__file__).parent / "data" / "cuda" / f"{fixture}.cuobjdump.txt").read_text())
    cuda_bin = tmp_path / "cuda" / "bin"
    cuda_bin.mkdir(parents=True)
    cuobjdump = cuda_bin / "cuobjdump"
    cuobjdump.write_text(f'#!/bin/sh\n[ "$1" = --list-elf ] && cat {listing}\nexit 0\n')
    cuobjdump.chmod(0o755)
    library = tmp_path / "_C.so"
    library.write_bytes(b"")
    found = smoke.list_cubins(str(cuda_bin / "nvcc"), str(library))
    assert found == list(cubins.parse_cuobjdump_listing(listing.read_text()).cubins) and found
    cuobjdump.unlink()
    assert smoke.list_cubins(str(cuda_bin / "nvcc"), str(library)) is None, "no cuobjdump: nothing is claimed"
