"""Fingerprint of everything that decides what the xformers wheel contains; a wheel is reused only on an equal one."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from gpufleet.buildplan import normalise_arch_list

FINGERPRINT_LENGTH = 16


@dataclass(frozen=True)
class Patch:
    name: str
    content: bytes


@dataclass(frozen=True)
class WheelInputs:
    xformers_version: str
    source_sha256: str
    patches: Sequence[Patch]
    torch_version: str
    cuda_version: str
    python_version: str
    arch_list: Sequence[str]


def _major_minor(version: str) -> str:
    # A wheel is tied to CPython's and CUDA's major.minor; patch releases keep ABI and code.
    return ".".join(version.strip().split(".")[:2])


def canonical_inputs(inputs: WheelInputs) -> dict[str, object]:
    """The normalised inputs that the fingerprint hashes (also written into the build manifest)."""
    return {
        "xformers_version": inputs.xformers_version.strip(),
        "source_sha256": inputs.source_sha256.strip().lower(),
        "patches": [{"name": p.name, "sha256": hashlib.sha256(p.content).hexdigest()} for p in inputs.patches],
        "torch_version": inputs.torch_version.strip(),
        "cuda_version": _major_minor(inputs.cuda_version),
        "python_version": _major_minor(inputs.python_version),
        "arch_list": normalise_arch_list(inputs.arch_list),
    }


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (wheels and sdists can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(inputs: WheelInputs) -> str:
    """Short hex digest of the canonical inputs; patch order counts, arch order and duplicates do not."""
    encoded = json.dumps(canonical_inputs(inputs), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:FINGERPRINT_LENGTH]


def read_patch_series(patch_dir: Path) -> list[Patch]:
    """Patches named in `patch_dir/series`, in order; blank lines and `#` comments are skipped."""
    series = patch_dir / "series"
    patches: list[Patch] = []
    for line in series.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        path = patch_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{series} names {name}, but {path} does not exist")
        patches.append(Patch(name, path.read_bytes()))
    return patches
