#!/usr/bin/env python3
"""GPU smoke test that gpufleet ships to every host: a ladder of checks, then attention throughput.

    <venv>/bin/python gpufleet_smoke.py --output /var/lib/gpufleet/smoke/smoke.json \
        [--nvcc /usr/local/cuda-12.8/bin/nvcc] [--heads 1] [--quick] [--device 0] [--host-label NAME] [--timeout 1200]

Rungs, in order (the first failure stops the ladder and names itself): driver (NVML, else nvidia-smi, also at
/usr/lib/wsl/lib/nvidia-smi), cuda_toolkit (nvcc --version), torch_cuda (torch sees the GPU, its sm_N is in
torch.cuda.get_arch_list()), matmul, xformers_cpp (the C++ part loads), attention (memory_efficient_attention
forward+backward against an fp32 reference in fp16, bf16, fp32, with the op that dispatched), sp24_sass
(xformers.ops.sp24.sparsify24 in a child with CUDA_DISABLE_PTX_JIT=1), throughput (xformers, SDPA, naive).

Output: one JSON document (schema_version SCHEMA_VERSION) to --output, else stdout; progress on stderr.
Exit code: 0 every rung passed, 1 a rung failed (the document says which and why), 2 bad arguments,
3 the --timeout watchdog stopped a hung run (the document names the rung that hung).

Needs only the standard library, torch and xformers; nvidia-ml-py is used when importable. Python >= 3.10.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import signal
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from typing import Any, Callable, Optional

SCHEMA_VERSION = 1

RUNGS: list[tuple[str, str]] = [
    ("driver", "NVIDIA driver answers"),
    ("cuda_toolkit", "CUDA toolkit nvcc answers"),
    ("torch_cuda", "torch sees the GPU and was built for its architecture"),
    ("matmul", "a matmul on the GPU is correct"),
    ("xformers_cpp", "xformers loads its C++ part"),
    ("attention", "memory_efficient_attention forward and backward are correct"),
    ("sp24_sass", "an xformers _C kernel runs with PTX JIT disabled"),
    ("throughput", "attention throughput measured"),
]

# The seed document's five shapes: (batch, sequence length, head dim).
SEED_SHAPES: list[tuple[int, int, int]] = [(2, 1024, 64), (2, 2048, 64), (1, 4096, 64), (1, 8192, 64), (1, 16384, 64)]
WIDE_HEADS = 16
WSL_NVIDIA_SMI = "/usr/lib/wsl/lib/nvidia-smi"
# Allowed max |error| relative to max |reference|; garbage from a wrong kernel is of order 1.
ATTENTION_TOLERANCE = {"float16": 2e-2, "bfloat16": 6e-2, "float32": 2e-3}
MATMUL_TOLERANCE = {"float16": 1e-2, "float32": 2e-3}
SUBPROCESS_TIMEOUT_S = 60
SP24_PROBE_TIMEOUT_S = 300


class RungFailed(Exception):
    """A rung's check did not hold; the message says what was found and what to do."""

    def __init__(self, message: str, details: Optional[dict] = None) -> None:
        super().__init__(message)
        self.details = details or {}


def squeeze(text: Any, limit: int = 600) -> str:
    """One line of at most `limit` characters keeping head and tail: xformers puts the decisive reason last."""
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    return flat[: limit // 3] + " ... " + flat[-(limit - limit // 3):]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def log(message: str) -> None:
    print(f"[gpufleet-smoke] {message}", file=sys.stderr, flush=True)


def new_document(host: str, argv: list[str]) -> dict:
    """The JSON document with every rung marked not_run; rungs and figures are filled in as the run goes."""
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "gpufleet_smoke",
        "host": host,
        "started_at": utc_now(),
        "finished_at": None,
        "argv": argv,
        "python": platform.python_version(),
        "platform": {"system": platform.system(), "release": platform.release(), "wsl": is_wsl()},
        "status": "running",
        "failed_rung": None,
        "message": "",
        "versions": {"driver": None, "nvml": None, "cuda_toolkit": None, "torch": package_version("torch"),
                     "torch_cuda": None, "xformers": package_version("xformers")},
        "gpu": None,
        "gpus": [],
        "rungs": [{"id": rid, "title": title, "status": "not_run", "message": "", "seconds": None, "details": {}}
                  for rid, title in RUNGS],
        "figures": None,
    }


def package_version(name: str) -> Optional[str]:
    """Installed version from package metadata, without importing (and so without starting CUDA)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def rung_entry(doc: dict, rung_id: str) -> dict:
    return next(r for r in doc["rungs"] if r["id"] == rung_id)


def finish_document(doc: dict) -> dict:
    """Set status, failed_rung and the summary message from the rungs, and mark later rungs as skipped."""
    failed = next((r for r in doc["rungs"] if r["status"] == "failed"), None)
    if failed is not None:
        doc["status"] = "failed"
        doc["failed_rung"] = failed["id"]
        doc["message"] = f"rung '{failed['id']}' ({failed['title']}) failed: {failed['message']}"
        for r in doc["rungs"]:
            if r["status"] == "not_run" and not r["message"]:
                r["message"] = f"not run: rung '{failed['id']}' failed first"
    elif all(r["status"] == "passed" for r in doc["rungs"]):
        doc["status"] = "passed"
        doc["message"] = "all rungs passed"
    else:
        doc["status"] = "incomplete"
        doc["message"] = "the run stopped before every rung ran"
    doc["finished_at"] = utc_now()
    return doc


def json_safe(value: Any) -> Any:
    """The value with inf/nan floats as strings: strict JSON readers (jq, browsers) reject Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_document(doc: dict, output: Optional[str]) -> None:
    text = json.dumps(json_safe(doc), indent=2, default=str, allow_nan=False) + "\n"
    if not output:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    # Write then rename so a reader never sees half a document.
    tmp = f"{output}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, output)


def is_wsl() -> bool:
    try:
        with open("/proc/sys/kernel/osrelease", encoding="utf-8") as fh:
            return "microsoft" in fh.read().lower()
    except OSError:
        return False


def run_command(cmd: list[str], timeout: float = SUBPROCESS_TIMEOUT_S, env: Optional[dict] = None
                ) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def driver_hint(text: str) -> str:
    """A fix for the driver failures seen in the field (see FACTS.md), or ''."""
    low = text.lower()
    if "version mismatch" in low:
        return (" The loaded kernel module and the driver libraries differ (an in-branch update):"
                " reboot the host, or unload the nvidia modules when nothing holds /dev/nvidia*.")
    if "no devices were found" in low:
        return (" On Blackwell (RTX 50xx) this means the proprietary kernel modules are loaded; install the open"
                " ones (setting driver_flavour: open). If they are open, check Resizable BAR / Above 4G decoding"
                " in the firmware (dmesg: RmInitAdapter failed).")
    if "couldn't communicate" in low or "has failed because" in low:
        return " The kernel module is not loaded: check `lsmod | grep nvidia` and dmesg, then reboot after a driver install."
    return ""


def query_nvml() -> tuple[str, str, list[dict]]:
    """Driver version, NVML version and one dict per GPU, read through nvidia-ml-py."""
    import pynvml

    pynvml.nvmlInit()
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        try:
            nvml_version = _text(pynvml.nvmlSystemGetNVMLVersion())
        except pynvml.NVMLError:
            nvml_version = None
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)

            def read(fn: Callable[[], Any]) -> Any:
                # WSL and some boards answer NotSupported for single fields; keep the rest.
                try:
                    return fn()
                except pynvml.NVMLError:
                    return None

            pci = read(lambda: pynvml.nvmlDeviceGetPciInfo(handle))
            cap = read(lambda: pynvml.nvmlDeviceGetCudaComputeCapability(handle))
            power_mw = read(lambda: pynvml.nvmlDeviceGetPowerManagementLimit(handle))
            mem = read(lambda: pynvml.nvmlDeviceGetMemoryInfo(handle))
            gpus.append({
                "index": index,
                "name": _text(pynvml.nvmlDeviceGetName(handle)),
                "pci_device_id": f"{(pci.pciDeviceId >> 16) & 0xFFFF:04X}" if pci is not None else None,
                "pci_bus_id": _text(pci.busId) if pci is not None else None,
                "compute_capability": f"{cap[0]}.{cap[1]}" if cap else None,
                "driver_version": driver,
                "pcie_link": {
                    "gen": read(lambda: pynvml.nvmlDeviceGetCurrPcieLinkGeneration(handle)),
                    "width": read(lambda: pynvml.nvmlDeviceGetCurrPcieLinkWidth(handle)),
                    "max_gen": read(lambda: pynvml.nvmlDeviceGetMaxPcieLinkGeneration(handle)),
                    "max_width": read(lambda: pynvml.nvmlDeviceGetMaxPcieLinkWidth(handle)),
                },
                "power_limit_w": round(power_mw / 1000.0, 1) if power_mw is not None else None,
                "memory_total_mib": int(mem.total // (1024 * 1024)) if mem is not None else None,
                "source": "nvml",
            })
        return driver, nvml_version, gpus
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


SMI_FIELDS = ["index", "name", "pci.device_id", "pci.bus_id", "compute_cap", "driver_version",
              "pcie.link.gen.current", "pcie.link.width.current", "pcie.link.gen.max", "pcie.link.width.max",
              "power.limit", "memory.total"]
SMI_MINIMAL_FIELDS = ["index", "name", "pci.device_id", "compute_cap", "driver_version"]


def find_nvidia_smi() -> Optional[str]:
    found = shutil.which("nvidia-smi")
    if found:
        return found
    # WSL puts it outside PATH.
    return WSL_NVIDIA_SMI if os.access(WSL_NVIDIA_SMI, os.X_OK) else None


def _smi_value(raw: str) -> Optional[str]:
    raw = raw.strip()
    return None if not raw or raw.startswith("[") or raw in ("N/A",) else raw


def _smi_number(raw: Optional[str], kind: type) -> Any:
    if raw is None:
        return None
    try:
        return kind(float(raw)) if kind is int else kind(raw)
    except ValueError:
        return None


def parse_nvidia_smi_csv(text: str, fields: list[str]) -> list[dict]:
    """GPUs from `nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits` output."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        values = [_smi_value(v) for v in line.split(",")]
        if len(values) != len(fields):
            raise ValueError(f"nvidia-smi printed {len(values)} fields where {len(fields)} were asked: {line!r}")
        row = dict(zip(fields, values))
        device_id = row.get("pci.device_id")
        gpus.append({
            "index": _smi_number(row.get("index"), int),
            "name": row.get("name"),
            # nvidia-smi prints device and vendor together: 0x2B8710DE.
            "pci_device_id": f"{(int(device_id, 16) >> 16) & 0xFFFF:04X}" if device_id else None,
            "pci_bus_id": row.get("pci.bus_id"),
            "compute_capability": row.get("compute_cap"),
            "driver_version": row.get("driver_version"),
            "pcie_link": {
                "gen": _smi_number(row.get("pcie.link.gen.current"), int),
                "width": _smi_number(row.get("pcie.link.width.current"), int),
                "max_gen": _smi_number(row.get("pcie.link.gen.max"), int),
                "max_width": _smi_number(row.get("pcie.link.width.max"), int),
            },
            "power_limit_w": _smi_number(row.get("power.limit"), float),
            "memory_total_mib": _smi_number(row.get("memory.total"), int),
            "source": "nvidia-smi",
        })
    return gpus


def query_nvidia_smi(smi: str) -> list[dict]:
    last_error = ""
    for fields in (SMI_FIELDS, SMI_MINIMAL_FIELDS):
        # Older drivers reject some fields outright; the minimal set still names the GPU.
        proc = run_command([smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"])
        if proc.returncode == 0:
            return parse_nvidia_smi_csv(proc.stdout, fields)
        last_error = (proc.stdout + proc.stderr).strip()
        if "not a valid field" not in last_error.lower():
            break
    raise RungFailed(f"{smi} exited non-zero: {last_error or '(no output)'}.{driver_hint(last_error)}")


def rung_driver(doc: dict, args: argparse.Namespace) -> str:
    problems = []
    gpus: list[dict] = []
    nvml_version = None
    try:
        driver, nvml_version, gpus = query_nvml()
    except ImportError:
        problems.append("nvidia-ml-py is not installed")
    except Exception as exc:
        problems.append(f"NVML failed: {str(exc).rstrip('.')}{driver_hint(str(exc))}")
    if not gpus:
        smi = find_nvidia_smi()
        if smi is None:
            problems.append(f"nvidia-smi is neither on PATH nor at {WSL_NVIDIA_SMI}")
        else:
            try:
                gpus = query_nvidia_smi(smi)
            except subprocess.TimeoutExpired:
                problems.append(f"{smi} did not answer within {SUBPROCESS_TIMEOUT_S} s (a hung driver: check dmesg)")
            except (RungFailed, OSError, ValueError) as exc:
                problems.append(str(exc))
    if not gpus:
        raise RungFailed("no NVIDIA driver answered: " + "; ".join(problems)
                         + ". Install the driver (deploys/driver.py) or, under WSL, the Windows NVIDIA driver.")
    doc["gpus"] = gpus
    if args.device >= len(gpus):
        raise RungFailed(f"--device {args.device} asked, but the driver lists {len(gpus)} GPU(s)")
    gpu = gpus[args.device]
    doc["gpu"] = gpu
    doc["versions"]["driver"] = gpu["driver_version"]
    doc["versions"]["nvml"] = nvml_version
    link = gpu["pcie_link"]
    return (f"{gpu['name']} [10de:{gpu['pci_device_id']}] cc {gpu['compute_capability']}, driver "
            f"{gpu['driver_version']}, PCIe gen {link['gen']} x{link['width']}, power limit {gpu['power_limit_w']} W"
            f" (via {gpu['source']}" + (f"; {problems[0]}" if problems else "") + ")")


def version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path))


def find_nvcc(explicit: Optional[str]) -> tuple[Optional[str], list[str]]:
    """nvcc from --nvcc, else $CUDA_HOME/bin, PATH, /usr/local/cuda/bin, the newest /usr/local/cuda-X.Y/bin;
    also the places tried."""
    candidates = []
    if explicit:
        candidates.append(explicit)
    else:
        for var in ("CUDA_HOME", "CUDA_PATH"):
            if os.environ.get(var):
                candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
        candidates.append(shutil.which("nvcc") or "nvcc on PATH")
        candidates.append("/usr/local/cuda/bin/nvcc")
        # Toolkits from NVIDIA's packages live in /usr/local/cuda-X.Y; take the newest when nothing else names one.
        candidates += sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), key=version_key, reverse=True)
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path, candidates
    return None, candidates


def rung_cuda_toolkit(doc: dict, args: argparse.Namespace) -> str:
    nvcc, tried = find_nvcc(args.nvcc)
    if nvcc is None:
        raise RungFailed("nvcc not found (tried " + ", ".join(tried) + "): install the CUDA toolkit"
                         " (deploys/cuda.py), set CUDA_HOME, or pass --nvcc PATH")
    proc = run_command([nvcc, "--version"])
    match = re.search(r"release (\d+\.\d+), V([\d.]+)", proc.stdout)
    if proc.returncode != 0 or match is None:
        raise RungFailed(f"{nvcc} --version exited {proc.returncode} without a release line: "
                         f"{(proc.stdout + proc.stderr).strip()[-400:]}")
    doc["versions"]["cuda_toolkit"] = match.group(2)
    rung_entry(doc, "cuda_toolkit")["details"].update({"nvcc": nvcc, "release": match.group(1),
                                                        "version": match.group(2)})
    return f"{nvcc}: CUDA {match.group(2)}"


def rung_torch_cuda(doc: dict, args: argparse.Namespace) -> str:
    import torch

    doc["versions"]["torch"] = torch.__version__
    doc["versions"]["torch_cuda"] = torch.version.cuda
    details = rung_entry(doc, "torch_cuda")["details"]
    details["torch_file"] = torch.__file__
    if torch.version.cuda is None:
        raise RungFailed(f"torch {torch.__version__} is a build without CUDA (torch.version.cuda is None): install"
                         " a CUDA build of torch (settings torch_index_url, torch_version)")
    if not torch.cuda.is_available():
        raise RungFailed(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU:"
                         " torch.cuda.is_available() is False although the driver answered; check that the driver"
                         f" supports CUDA {torch.version.cuda} and that CUDA_VISIBLE_DEVICES does not hide the GPU")
    count = torch.cuda.device_count()
    if args.device >= count:
        raise RungFailed(f"torch sees {count} GPU(s); --device {args.device} does not exist for it")
    major, minor = torch.cuda.get_device_capability(args.device)
    arch = f"sm_{major}{minor}"
    arch_list = torch.cuda.get_arch_list()
    details.update({"device_name": torch.cuda.get_device_name(args.device), "capability": f"{major}.{minor}",
                    "arch": arch, "arch_list": arch_list, "device_count": count})
    if arch not in arch_list:
        raise RungFailed(f"torch {torch.__version__} was built for {' '.join(arch_list)}, not {arch} of "
                         f"{details['device_name']}: install a torch built for {arch} (for sm_120 a CUDA 12.8+"
                         " build; settings torch_index_url, torch_version)")
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees {details['device_name']}, {arch} in its arch list"


def relative_error(actual: Any, reference: Any) -> float:
    """max |actual - reference| / max |reference|, in float64; inf when anything is not finite."""
    import torch

    actual = actual.detach().double()
    reference = reference.detach().double()
    if not bool(torch.isfinite(actual).all()):
        return math.inf
    scale = float(reference.abs().max()) or 1.0
    return float((actual - reference).abs().max()) / scale


def rung_matmul(doc: dict, args: argparse.Namespace) -> str:
    import torch

    device = torch.device("cuda", args.device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1024, 1024, generator=gen)
    b = torch.randn(1024, 1024, generator=gen)
    errors = {}
    for name, dtype in (("float32", torch.float32), ("float16", torch.float16)):
        ref = a.to(dtype).double() @ b.to(dtype).double()
        out = (a.to(device, dtype) @ b.to(device, dtype)).cpu()
        errors[name] = relative_error(out, ref)
    rung_entry(doc, "matmul")["details"]["relative_error"] = errors
    bad = {k: v for k, v in errors.items() if not v <= MATMUL_TOLERANCE[k]}
    if bad:
        raise RungFailed("1024x1024 matmul on the GPU disagrees with the CPU: relative error "
                         + ", ".join(f"{k} {v:.3g} (allowed {MATMUL_TOLERANCE[k]})" for k, v in bad.items()))
    return "1024x1024 matmul matches the CPU: " + ", ".join(f"{k} {v:.2g}" for k, v in errors.items())


def rung_xformers_cpp(doc: dict, args: argparse.Namespace) -> str:
    import torch

    try:
        import xformers
        import xformers.info  # noqa: F401  (what `python -m xformers.info` imports)
        from xformers import _cpp_lib
    except ImportError as exc:
        raise RungFailed(f"xformers is not importable next to torch {torch.__version__} ({exc}): install our build"
                         " (deploys/xformers.py)")

    doc["versions"]["xformers"] = xformers.__version__
    details = rung_entry(doc, "xformers_cpp")["details"]
    details["xformers_file"] = xformers.__file__
    build = _cpp_lib._build_metadata
    error = _cpp_lib._cpp_library_load_exception
    if build is None and error is not None and getattr(error, "build_info", None) is not None:
        build = error.build_info
    if build is not None:
        details["build"] = {"torch": build.torch_version, "cuda": build.cuda_version, "python": build.python_version,
                            "arch_list": build.build_env.get("TORCH_CUDA_ARCH_LIST"),
                            "package_from": build.build_env.get("XFORMERS_PACKAGE_FROM")}
    if not xformers._has_cpp_library:
        found = " ".join(str(error).split()).rstrip(".") if error is not None else "unknown reason"
        if error is not None and error.__cause__ is not None:
            # The loader's own error (e.g. an undefined symbol or a missing libcudart) is the real diagnosis.
            found += f" (loader: {squeeze(error.__cause__, 400)})"
        raise RungFailed(f"xformers {xformers.__version__} cannot load its C++ part next to torch {torch.__version__}:"
                         f" {found}. Build xformers from source on this host against this torch (deploys/xformers.py)",
                         details)
    try:
        details["nvcc_build_version"] = ".".join(str(v) for v in torch.ops.xformers._nvcc_build_version())
    except (RuntimeError, AttributeError):
        pass
    arch_list = (details.get("build") or {}).get("arch_list")
    return f"xformers {xformers.__version__} loaded _C (built for torch {(details.get('build') or {}).get('torch')}, arch list {arch_list})"


def dispatched_ops(q: Any, k: Any, v: Any) -> tuple[str, str]:
    """Names of the forward and backward ops xformers picks for these inputs (e.g. fa2F@2.5.7-pt, cutlassB-pt)."""
    from xformers.ops import fmha
    from xformers.ops.fmha import dispatch

    try:
        inp = fmha.Inputs(query=q, key=k, value=v)
        inp.validate_inputs()
        inp.normalize_bmhk()
        fw = dispatch._dispatch_fw(inp, True).NAME
    except Exception as exc:
        fw = f"none ({squeeze(exc)})"
    try:
        inp = fmha.Inputs(query=q, key=k, value=v)
        inp.validate_inputs()
        inp.normalize_bmhk()
        bw = dispatch._dispatch_bw(inp, None).NAME
    except Exception as exc:
        bw = f"none ({squeeze(exc)})"
    return fw, bw


def reference_attention(q: Any, k: Any, v: Any) -> Any:
    """softmax(q k^T / sqrt(d)) v on BMHK tensors, the equivalent code from xformers' docstring."""
    scale = q.shape[-1] ** -0.5
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    attn = ((qt * scale) @ kt.transpose(-2, -1)).softmax(-1)
    return (attn @ vt).transpose(1, 2)


def rung_attention(doc: dict, args: argparse.Namespace) -> str:
    import torch
    import xformers.ops as xops

    device = torch.device("cuda", args.device)
    batch, seq, heads, dim = 2, 1024, 8, 64
    gen = torch.Generator().manual_seed(1)
    base = [torch.randn(batch, seq, heads, dim, generator=gen) for _ in range(4)]
    results = {}
    failures = []
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        entry: dict = {}
        results[name] = entry
        q, k, v = (t.to(device, dtype).requires_grad_() for t in base[:3])
        grad_out = base[3].to(device, dtype)
        entry["op_fw"], entry["op_bw"] = dispatched_ops(q, k, v)
        try:
            out = xops.memory_efficient_attention(q, k, v)
            out.backward(grad_out)
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {squeeze(exc, 900)}"
            failures.append(f"{name}: {entry['error']}")
            continue
        # The reference sees the same rounded inputs, so only the kernel's own error is measured.
        rq, rk, rv = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = reference_attention(rq, rk, rv)
        ref.backward(grad_out.float())
        errors = {"out": relative_error(out, ref), "grad_q": relative_error(q.grad, rq.grad),
                  "grad_k": relative_error(k.grad, rk.grad), "grad_v": relative_error(v.grad, rv.grad)}
        entry["relative_error"] = errors
        worst = max(errors.values())
        entry["tolerance"] = ATTENTION_TOLERANCE[name]
        if not worst <= ATTENTION_TOLERANCE[name]:
            failures.append(f"{name} ({entry['op_fw']}/{entry['op_bw']}): relative error {worst:.3g} "
                            f"exceeds {ATTENTION_TOLERANCE[name]}")
    details = rung_entry(doc, "attention")["details"]
    details.update({"shape": f"{batch}x{seq}x{heads}x{dim}", "dtypes": results})
    if failures:
        hint = ""
        if any("capability" in f for f in failures):
            hint = (" (cutlassF-pt/cutlassB-pt capped below this GPU's capability: apply the xformers patch series"
                    " files/patches/xformers-0.0.35 and rebuild)")
        raise RungFailed("memory_efficient_attention is wrong or unavailable: " + "; ".join(failures) + hint)
    return "fwd+bwd correct: " + ", ".join(
        f"{n} {r['op_fw']}/{r['op_bw']} err {max(r['relative_error'].values()):.2g}" for n, r in results.items())



def sp24_probe(device_index: int) -> dict:
    """Runs in a child whose CUDA_DISABLE_PTX_JIT=1 was set before CUDA started: sparsify24 on 128x128 fp16."""
    import torch
    from xformers.ops import sp24

    if os.environ.get("CUDA_DISABLE_PTX_JIT") != "1":
        return {"ok": False, "message": "probe started without CUDA_DISABLE_PTX_JIT=1"}
    device = torch.device("cuda", device_index)
    x = torch.randn(128, 128, generator=torch.Generator().manual_seed(2)).to(device, torch.float16)
    sparse = sp24.sparsify24(x)
    dense = sp24.SparsifyApplyDenseOutput.OPERATOR(x, sparse.threads_masks)
    torch.cuda.synchronize(device)
    groups = dense.reshape(128, 32, 4)
    kept = dense != 0
    per_group = int(groups.ne(0).sum(-1).max())
    matches = bool(torch.equal(dense[kept], x[kept]))
    fraction = float(kept.float().mean())
    details = {"packed_shape": list(sparse.packed.shape), "max_nonzero_per_group_of_4": per_group,
               "kept_fraction": round(fraction, 4), "kept_values_match_input": matches}
    ok = per_group <= 2 and matches and 0.25 <= fraction <= 0.5
    message = ("sparsify24 ran on 128x128 fp16 with PTX JIT disabled and produced a valid 2:4 pattern"
               if ok else "sparsify24 ran but its output is not a 2:4 sparsification of the input")
    return {"ok": ok, "message": message, "details": details}


def load_cubin_reader() -> Optional[Any]:
    """The build's own reader of device code, ../xformers/cubins.py from this script: on a host the xformers stage
    ships it to <work_dir>/xformers/, in the repository it is files/xformers/. None where it is missing."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "xformers", "cubins.py")
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location("gpufleet_cubins", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def list_cubins(nvcc: Optional[str], library: str) -> Optional[list[str]]:
    """sm_N cubins in a shared library, read with cuobjdump beside nvcc by cubins.py; None when either is missing."""
    cuobjdump = os.path.join(os.path.dirname(nvcc), "cuobjdump") if nvcc else shutil.which("cuobjdump")
    reader = load_cubin_reader()
    if not cuobjdump or not os.access(cuobjdump, os.X_OK) or reader is None:
        return None
    try:
        code, _tool = reader.read_device_code(library, cuobjdump)
    except (OSError, subprocess.SubprocessError, reader.FatbinError):
        return None
    return list(code.cubins)


def rung_sp24_sass(doc: dict, args: argparse.Namespace) -> str:
    env = dict(os.environ, CUDA_DISABLE_PTX_JIT="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--sp24-probe", "--device", str(args.device)]
    details = rung_entry(doc, "sp24_sass")["details"]
    arch = rung_entry(doc, "torch_cuda")["details"].get("arch")
    details["arch"] = arch
    xformers_file = rung_entry(doc, "xformers_cpp")["details"].get("xformers_file")
    if xformers_file:
        library = os.path.join(os.path.dirname(xformers_file), "_C.so")
        if os.path.exists(library):
            details["cubins"] = list_cubins(rung_entry(doc, "cuda_toolkit")["details"].get("nvcc"), library)
    try:
        proc = run_command(cmd, timeout=SP24_PROBE_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        raise RungFailed(f"the sparsify24 probe did not finish within {SP24_PROBE_TIMEOUT_S} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = " ".join((proc.stdout + proc.stderr).split())[-800:]
        raise RungFailed(f"the sparsify24 probe exited {proc.returncode} without a result: {tail}. With PTX JIT"
                         f" disabled this means xformers' _C.so has no {arch} SASS: rebuild it with this"
                         " architecture in xformers_arch_list")
    result = json.loads(lines[-1])
    details.update(result.get("details") or {})
    if not result.get("ok"):
        raise RungFailed(f"{result.get('message')}: {result.get('error', '')}".rstrip(": ")
                         + f". xformers' _C.so must carry {arch} SASS: rebuild it with this architecture"
                         " in xformers_arch_list")
    details["sass_proven"] = True
    return f"{result['message']} ({arch} SASS present)"


def time_cuda(fn: Callable[[], Any], quick: bool) -> tuple[float, int]:
    """Mean seconds per call of fn, by CUDA events after warm-up, and the iteration count."""
    import torch

    warmup = 2 if quick else 5
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end) / 1000.0, 1e-6)
    target = 0.05 if quick else 0.3
    iters = int(min(max(target / once, 3 if quick else 10), 200 if quick else 1000))
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0 / iters, iters


def attention_flops(batch: int, seq: int, heads: int, head_dim: int) -> float:
    """Forward FLOPs of non-causal attention: two matmuls of 2*N*N*D per head."""
    return 4.0 * batch * heads * seq * seq * head_dim


def make_figure(batch: int, seq: int, heads: int, head_dim: int, seconds: float, peak_bytes: int,
                gemm_tflops: Optional[float], iters: int) -> dict:
    tflops = attention_flops(batch, seq, heads, head_dim) / seconds / 1e12
    return {
        "ms": round(seconds * 1000, 4),
        "iters": iters,
        "tok_per_s": round(batch * seq / seconds, 1),
        "tflops": round(tflops, 2),
        "pct_of_gemm_peak": round(100 * tflops / gemm_tflops, 1) if gemm_tflops else None,
        "peak_mem_mib": round(peak_bytes / 2**20, 1),
    }


def measure(fn: Callable[[], Any], shape: tuple[int, int, int, int], gemm_tflops: Optional[float], quick: bool) -> dict:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    seconds, iters = time_cuda(fn, quick)
    return make_figure(*shape, seconds, torch.cuda.max_memory_allocated(), gemm_tflops, iters)


def measure_gemm(device: Any, quick: bool) -> dict:
    import torch

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    seconds, iters = time_cuda(lambda: a @ b, quick)
    del a, b
    torch.cuda.empty_cache()
    return {"shape": f"{n}x{n}x{n}", "dtype": "float16", "ms": round(seconds * 1000, 4), "iters": iters,
            "tflops": round(2.0 * n**3 / seconds / 1e12, 2)}


def naive_skip_reason(batch: int, seq: int, heads: int, device: Any) -> Optional[str]:
    import torch

    scores = batch * heads * seq * seq * 2
    # Scores, their softmax and the autocast copies: about three score matrices live at once.
    need = 3 * scores
    free, _ = torch.cuda.mem_get_info(device)
    if need > 0.6 * free:
        return (f"skipped: the {batch}x{heads}x{seq}x{seq} fp16 score matrix needs about {need / 2**30:.1f} GiB,"
                f" {free / 2**30:.1f} GiB free")
    return None


def rung_throughput(doc: dict, args: argparse.Namespace) -> str:
    import torch
    import torch.nn.functional as F
    import xformers.ops as xops

    device = torch.device("cuda", args.device)
    torch.cuda.set_device(device)
    gemm = measure_gemm(device, args.quick)
    figures: dict = {"dtype": "float16", "quick": args.quick, "heads": args.heads, "gemm": gemm, "attention": []}
    doc["figures"] = figures
    sets = [("seed", args.heads)] + ([("wide", WIDE_HEADS)] if args.heads != WIDE_HEADS else [])
    errors = []
    for set_name, heads in sets:
        for batch, seq, dim in SEED_SHAPES:
            shape = (batch, seq, heads, dim)
            log(f"throughput {set_name} {batch}x{seq}x{heads}x{dim}")
            q, k, v = (torch.randn(batch, seq, heads, dim, device=device, dtype=torch.float16) for _ in range(3))
            qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            entry: dict = {"set": set_name, "batch": batch, "seq": seq, "heads": heads, "head_dim": dim,
                           "op_fw": dispatched_ops(q, k, v)[0]}
            methods: list[tuple[str, Callable[[], Any]]] = [
                ("xformers", lambda: xops.memory_efficient_attention(q, k, v)),
                ("sdpa", lambda: F.scaled_dot_product_attention(qt, kt, vt)),
            ]
            skip = naive_skip_reason(batch, seq, heads, device)
            if skip:
                entry["naive"] = {"skipped": skip}
            else:
                methods.append(("naive", lambda: reference_attention(q, k, v)))
            with torch.no_grad():
                for name, fn in methods:
                    try:
                        entry[name] = measure(fn, (batch, seq, heads, dim), gemm["tflops"], args.quick)
                    except torch.cuda.OutOfMemoryError as exc:
                        torch.cuda.empty_cache()
                        entry[name] = {"skipped": f"out of memory: {squeeze(exc, 200)}"}
                    except Exception as exc:
                        entry[name] = {"error": f"{type(exc).__name__}: {squeeze(exc, 400)}"}
                        if name != "naive":
                            errors.append(f"{name} at {batch}x{seq}x{heads}x{dim}: {entry[name]['error']}")
            if "tflops" in entry.get("xformers", {}) and "tflops" in entry.get("sdpa", {}):
                entry["xformers_vs_sdpa"] = round(entry["xformers"]["tflops"] / entry["sdpa"]["tflops"], 3)
            figures["attention"].append(entry)
            del q, k, v, qt, kt, vt
            torch.cuda.empty_cache()
    if errors:
        raise RungFailed("attention throughput could not be measured: " + "; ".join(errors))
    wide = [e for e in figures["attention"] if e["heads"] == WIDE_HEADS and "tflops" in e.get("xformers", {})]
    best = max(wide, key=lambda e: e["xformers"]["tflops"])
    return (f"GEMM {gemm['tflops']} TFLOP/s; xformers best {best['xformers']['tflops']} TFLOP/s at "
            f"{best['batch']}x{best['seq']}x{best['heads']}x{best['head_dim']} ({best.get('xformers_vs_sdpa')}x SDPA)")


RUNG_FUNCTIONS: dict[str, Callable[[dict, argparse.Namespace], str]] = {
    "driver": rung_driver,
    "cuda_toolkit": rung_cuda_toolkit,
    "torch_cuda": rung_torch_cuda,
    "matmul": rung_matmul,
    "xformers_cpp": rung_xformers_cpp,
    "attention": rung_attention,
    "sp24_sass": rung_sp24_sass,
    "throughput": rung_throughput,
}


def run_ladder(doc: dict, args: argparse.Namespace) -> dict:
    for rung_id, title in RUNGS:
        entry = rung_entry(doc, rung_id)
        entry["status"] = "running"
        log(f"{rung_id}: {title} ...")
        start = time.monotonic()
        try:
            entry["message"] = RUNG_FUNCTIONS[rung_id](doc, args)
            entry["status"] = "passed"
        except RungFailed as exc:
            entry["status"] = "failed"
            entry["message"] = str(exc)
            entry["details"].update(exc.details)
        except BaseException as exc:
            # Anything a rung raises, even an import error or Ctrl-C, is that rung's failure, not a crash.
            entry["status"] = "failed"
            entry["message"] = f"{type(exc).__name__}: {squeeze(exc, 1000)}"
            entry["details"]["traceback"] = traceback.format_exc(limit=8)
        entry["seconds"] = round(time.monotonic() - start, 3)
        log(f"{rung_id}: {entry['status']}: {entry['message']}")
        if entry["status"] != "passed":
            break
    return finish_document(doc)


class Terminated(Exception):
    """SIGTERM arrived; raised in the running rung so the document still gets written."""


def on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated("the run received SIGTERM")


def start_watchdog(doc: dict, args: argparse.Namespace) -> threading.Timer:
    """After --timeout seconds, write the document with the running rung failed and exit 3, whatever hangs."""

    def expire() -> None:
        running = next((r for r in doc["rungs"] if r["status"] == "running"), None)
        if running is not None:
            running["status"] = "failed"
            running["message"] = f"timed out: the run exceeded --timeout {args.timeout} s during this rung"
        try:
            finish_document(doc)
            write_document(doc, args.output)
        except Exception as exc:
            log(f"watchdog: could not write the document: {exc}")
        finally:
            log(f"watchdog: --timeout {args.timeout} s exceeded; wrote what was known")
            os._exit(3)

    timer = threading.Timer(args.timeout, expire)
    timer.daemon = True
    timer.start()
    return timer


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="gpufleet GPU smoke test: a ladder of checks, then throughput.")
    parser.add_argument("--output", "-o", help="write the JSON document here (default: stdout)")
    parser.add_argument("--heads", type=int, default=1, help="attention heads for the seed shapes (default 1)")
    parser.add_argument("--quick", action="store_true", help="fewer warm-up and timed iterations")
    parser.add_argument("--nvcc", help="nvcc to ask for the CUDA version (default: $CUDA_HOME/bin/nvcc, PATH)")
    parser.add_argument("--device", type=int, default=0, help="GPU index to test (default 0)")
    parser.add_argument("--host-label", default=None, help="name for this host in the report (default: hostname)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="give up after this many seconds (exit 3)")
    parser.add_argument("--sp24-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.heads < 1:
        parser.error("--heads must be at least 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.sp24_probe:
        try:
            result = sp24_probe(args.device)
        except Exception as exc:
            result = {"ok": False, "message": "sparsify24 failed",
                      "error": f"{type(exc).__name__}: {squeeze(exc, 800)}"}
        print(json.dumps(result), flush=True)
        return 0 if result["ok"] else 1
    doc = new_document(args.host_label or socket.gethostname(), argv)
    watchdog = start_watchdog(doc, args)
    signal.signal(signal.SIGTERM, on_sigterm)
    run_ladder(doc, args)
    watchdog.cancel()
    write_document(doc, args.output)
    log(f"{doc['status']}: {doc['message']}" + (f" -> {args.output}" if args.output else ""))
    return 0 if doc["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
