"""Where things live: the CUDA toolkit on a host, the wheel cache and the smoke test script on this machine."""

from __future__ import annotations

from pathlib import Path

from pyinfra import state

from gpufleet.settings import REPO_ROOT

# The smoke test, uploaded to each host; its content is part of the smoke stamp (decide.smoke_stamp).
SMOKE_SCRIPT = REPO_ROOT / "files" / "smoke" / "gpufleet_smoke.py"


def cuda_home(config: dict) -> str:
    """The toolkit torch and xformers use on the host: an accepted existing one, else the one gpufleet installs."""
    return config["cuda_existing_home"] or f"/usr/local/cuda-{config['cuda_version']}"


def local_cache(config: dict, fp: str) -> Path:
    """This machine's folder for the xformers wheel of fingerprint fp (wheel_cache_dir, relative to the run's cwd)."""
    root = Path(config["wheel_cache_dir"])
    return (root if root.is_absolute() else Path(state.cwd or REPO_ROOT) / root) / fp
