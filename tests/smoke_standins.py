"""What the smoke script's tests and fixture generator share: the script, and stand-ins for tools this machine lacks.

Each stand-in prints what the real tool prints on an H100 host (FACTS.md), so the ladder reaches torch.
"""

import os
from pathlib import Path

from tests.host_scripts import FILES, load_host_script

SCRIPT = FILES / "smoke" / "gpufleet_smoke.py"
STANDIN_NVIDIA_SMI = ("#!/bin/sh\necho '0, NVIDIA H100 80GB HBM3, 0x233010DE, 00000000:19:00.0, 9.0, 580.159.04, "
                      "5, 16, 5, 16, 700.00, 81559'\n")
STANDIN_NVCC = ("#!/bin/sh\nprintf 'nvcc: NVIDIA (R) Cuda compiler driver\\nCuda compilation tools, release 12.8, "
                "V12.8.93\\nBuild cuda_12.8.r12.8/compiler.35583870_0\\n'\n")


def load_script():
    return load_host_script("smoke/gpufleet_smoke.py", "gpufleet_smoke")


def system_bin_without(tmp_path: Path, *tools: str) -> Path:
    """/usr/bin and /bin as one directory of links, less `tools`: a PATH on which a GPU host's real nvidia-smi or
    nvcc is not found, so a test that means "no driver here" says so on every machine."""
    bin_dir = tmp_path / "system-bin"
    bin_dir.mkdir(exist_ok=True)
    for directory in (Path("/usr/bin"), Path("/bin")):
        for entry in directory.iterdir():
            link = bin_dir / entry.name
            if entry.name not in tools and not os.path.lexists(link):
                link.symlink_to(entry)
    return bin_dir
