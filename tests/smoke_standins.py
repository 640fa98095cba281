"""What the smoke script's tests and fixture generator share: the script, and stand-ins for tools this machine lacks.

Each stand-in prints what the real tool prints on an H100 host (FACTS.md), so the ladder reaches torch.
"""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "files" / "smoke" / "gpufleet_smoke.py"
STANDIN_NVIDIA_SMI = ("#!/bin/sh\necho '0, NVIDIA H100 80GB HBM3, 0x233010DE, 00000000:19:00.0, 9.0, 580.159.04, "
                      "5, 16, 5, 16, 700.00, 81559'\n")
STANDIN_NVCC = ("#!/bin/sh\nprintf 'nvcc: NVIDIA (R) Cuda compiler driver\\nCuda compilation tools, release 12.8, "
                "V12.8.93\\nBuild cuda_12.8.r12.8/compiler.35583870_0\\n'\n")


def load_script():
    spec = importlib.util.spec_from_file_location("gpufleet_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
