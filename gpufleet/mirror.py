"""Lay out wheels as a PEP 503 simple index that pip reads over file:// or http:// (python -m gpufleet.mirror SRC DEST)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from packaging.utils import canonicalize_name

from gpufleet.fingerprint import file_sha256


def project_name(wheel: str) -> str:
    """The normalised project name of a wheel file (PEP 503)."""
    return canonicalize_name(wheel.split("-", 1)[0])


def build_simple_index(source: Path, dest: Path) -> list[str]:
    """Copy every wheel of source into dest/<project>/ with an index.html carrying sha256 fragments."""
    projects: dict[str, list[Path]] = {}
    for wheel in sorted(source.glob("*.whl")):
        projects.setdefault(project_name(wheel.name), []).append(wheel)
    dest.mkdir(parents=True, exist_ok=True)
    for project, wheels in projects.items():
        folder = dest / project
        folder.mkdir(exist_ok=True)
        links = []
        for wheel in wheels:
            target = folder / wheel.name
            if not target.exists() or target.stat().st_size != wheel.stat().st_size:
                shutil.copy2(wheel, target)
            sha = file_sha256(target)
            links.append(f'<a href="{wheel.name}#sha256={sha}">{wheel.name}</a><br>')
        (folder / "index.html").write_text("<!DOCTYPE html><html><body>\n" + "\n".join(links) + "\n</body></html>\n")
    root = "\n".join(f'<a href="{p}/">{p}</a><br>' for p in sorted(projects))
    (dest / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{root}\n</body></html>\n")
    return sorted(projects)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m gpufleet.mirror WHEEL_DIR INDEX_DIR")
    print("simple index:", ", ".join(build_simple_index(Path(sys.argv[1]), Path(sys.argv[2]))) or "no wheels")
