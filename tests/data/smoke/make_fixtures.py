"""Regenerates the smoke documents under tests/data/smoke/fleet/.

real-*.json come from running files/smoke/gpufleet_smoke.py itself on a machine without a GPU (pass --python,
an interpreter with a CPU torch). synthetic-*.json are built with the script's own document code
(new_document, make_figure, finish_document) from figures chosen here, and carry "synthetic": true.

    python tests/data/smoke/make_fixtures.py --python /tmp/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
from tests.smoke_standins import SCRIPT, STANDIN_NVCC, STANDIN_NVIDIA_SMI, load_script  # noqa: E402

FLEET = Path(__file__).resolve().parent / "fleet"



def write_standins(directory: Path) -> None:
    for name, text in (("nvidia-smi", STANDIN_NVIDIA_SMI), ("nvcc", STANDIN_NVCC)):
        path = directory / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


def real_runs(python: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = "/usr/bin:/bin"
    subprocess.run([python, str(SCRIPT), "--host-label", "cpu-box-no-driver",
                    "--output", str(FLEET / "real-cpu-no-driver.json")], env=env, check=False, timeout=300)
    with tempfile.TemporaryDirectory() as tmp:
        write_standins(Path(tmp))
        real_nvcc = load_script().find_nvcc(None)[0]
        if real_nvcc:
            # The build machine has a real nvcc (CUDA 13.0); only nvidia-smi needs a stand-in then.
            (Path(tmp) / "nvcc").unlink()
        env["PATH"] = f"{tmp}:/usr/bin:/bin"
        subprocess.run([python, str(SCRIPT), "--host-label", "cpu-box-standin-h100",
                        "--output", str(FLEET / "real-cpu-torch-without-cuda.json")], env=env, check=False,
                       timeout=300)


def gpu_info(name: str, pci: str, cc: str, driver: str, power: float, mem: int) -> dict:
    return {"index": 0, "name": name, "pci_device_id": pci, "pci_bus_id": "00000000:01:00.0",
            "compute_capability": cc, "driver_version": driver,
            "pcie_link": {"gen": 5, "width": 16, "max_gen": 5, "max_width": 16},
            "power_limit_w": power, "memory_total_mib": mem, "source": "nvml"}


def synthetic_doc(smoke, host: str, gpu: dict, *, torch_version: str, scale: float, gemm_tflops: float,
                  seed_tok_s: dict, wide_tflops: float, vs_sdpa: float, fail_at: str | None = None,
                  fail_message: str = "") -> dict:
    """A document as the script writes it, with figures derived from the given speeds times `scale`."""
    doc = smoke.new_document(host, ["--output", f"/var/lib/gpufleet/smoke/{host}.json"])
    doc["synthetic"] = True
    doc["gpu"], doc["gpus"] = gpu, [gpu]
    doc["versions"].update({"driver": gpu["driver_version"], "nvml": "13.580.95.05", "cuda_toolkit": "12.8.93",
                            "torch": torch_version, "torch_cuda": "12.8", "xformers": "0.0.35"})
    arch = "sm_" + gpu["compute_capability"].replace(".", "")
    for rung in doc["rungs"]:
        if rung["id"] == "sp24_sass":
            rung["details"] = {"arch": arch}
        if rung["id"] == fail_at:
            rung.update(status="failed", message=fail_message, seconds=0.5)
            break
        rung.update(status="passed", message="synthetic", seconds=0.5)
        if rung["id"] == "sp24_sass":
            rung["details"].update(sass_proven=True, cubins=["sm_120", "sm_90"])
    if fail_at is None:
        attention = []
        for set_name, heads in (("seed", 1), ("wide", 16)):
            for batch, seq, dim in smoke.SEED_SHAPES:
                flops = smoke.attention_flops(batch, seq, heads, dim)
                if set_name == "seed":
                    xf_s = batch * seq / (seed_tok_s[f"{batch}x{seq}x{dim}"] * scale)
                else:
                    xf_s = flops / (wide_tflops * scale * 1e12)
                sdpa_s = xf_s * vs_sdpa
                inputs = 3 * batch * seq * heads * dim * 2
                entry = {"set": set_name, "batch": batch, "seq": seq, "heads": heads, "head_dim": dim,
                         "op_fw": "fa2F@2.5.7-pt",
                         "xformers": smoke.make_figure(batch, seq, heads, dim, xf_s, inputs * 2, gemm_tflops, 100),
                         "sdpa": smoke.make_figure(batch, seq, heads, dim, sdpa_s, inputs * 2, gemm_tflops, 100)}
                entry["xformers_vs_sdpa"] = round(entry["xformers"]["tflops"] / entry["sdpa"]["tflops"], 3)
                need = 3 * batch * heads * seq * seq * 2
                if need > 0.6 * gpu["memory_total_mib"] * 2**20:
                    entry["naive"] = {"skipped": f"skipped: the {batch}x{heads}x{seq}x{seq} fp16 score matrix needs"
                                                 f" about {need / 2**30:.1f} GiB"}
                else:
                    entry["naive"] = smoke.make_figure(batch, seq, heads, dim, xf_s * 8, inputs + need, gemm_tflops, 20)
                attention.append(entry)
        doc["figures"] = {"dtype": "float16", "quick": False, "heads": 1, "attention": attention,
                          "gemm": {"shape": "8192x8192x8192", "dtype": "float16", "ms": 1.0, "iters": 100,
                                   "tflops": gemm_tflops}}
    return smoke.finish_document(doc)


def synthetic_fleet() -> list[tuple[str, dict]]:
    smoke = load_script()
    seed = {"2x1024x64": 19.9e6, "2x2048x64": 46.4e6, "1x4096x64": 60.4e6, "1x8192x64": 61.1e6,
            "1x16384x64": 42.0e6}
    torch_nightly = "2.12.0.dev20260407+cu128"
    d5090 = gpu_info("NVIDIA GeForce RTX 5090 D", "2B87", "12.0", "580.95.05", 575.0, 32607)
    d5090v2 = gpu_info("NVIDIA GeForce RTX 5090 D V2", "2B8C", "12.0", "580.95.05", 575.0, 24463)
    h100 = gpu_info("NVIDIA H100 80GB HBM3", "2330", "9.0", "580.159.04", 700.0, 81559)
    common = dict(torch_version=torch_nightly, seed_tok_s=seed, vs_sdpa=0.62)
    # Four 5090 D hosts around 1.0 and one 25% slow; a 5090 D v2 alone; an H100 (from FACTS.md's measurements).
    docs = [(f"synthetic-ws0{i}.json", synthetic_doc(smoke, f"ws0{i}", d5090, scale=s, gemm_tflops=209.5,
                                                      wide_tflops=130.0, **common))
            for i, s in ((1, 1.0), (2, 0.97), (3, 1.02), (4, 0.75))]
    docs.append(("synthetic-ws05-d-v2.json", synthetic_doc(smoke, "ws05", d5090v2, scale=0.9, gemm_tflops=200.0,
                                                           wide_tflops=130.0, **common)))
    docs.append(("synthetic-h100-a.json", synthetic_doc(smoke, "h100-a", h100, torch_version="2.11.0+cu130",
                                                        scale=1.0, gemm_tflops=772.0, seed_tok_s=seed,
                                                        wide_tflops=300.0, vs_sdpa=0.62)))
    docs.append(("synthetic-ws06-no-sm120.json", synthetic_doc(
        smoke, "ws06", d5090, scale=1.0, gemm_tflops=209.5, wide_tflops=130.0, fail_at="sp24_sass",
        fail_message="the sparsify24 probe exited 1 without a result: CUDA error: no kernel image is available for "
                     "execution on the device. With PTX JIT disabled this means xformers' _C.so has no sm_120 SASS:"
                     " rebuild it with this architecture in xformers_arch_list", **common)))
    return docs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", help="interpreter with a CPU torch for the real-*.json runs (skipped if unset)")
    args = parser.parse_args()
    FLEET.mkdir(parents=True, exist_ok=True)
    for name, doc in synthetic_fleet():
        (FLEET / name).write_text(json.dumps(doc, indent=2) + "\n")
    if args.python:
        real_runs(args.python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
