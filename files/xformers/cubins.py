"""Which GPU architectures a compiled CUDA library really carries code for.

Two readers that must agree: the text of `cuobjdump --list-elf` / `--list-ptx`, and a pure-Python reader of the
ELF's `.nv_fatbin` section for hosts without cuobjdump. A host-side script, standard library only: the xformers
stage ships it beside `build_wheel.sh` (<work_dir>/xformers/), which runs it with the build venv's Python, and the
smoke test (<work_dir>/smoke/gpufleet_smoke.py) imports it from there; the repository keeps the same layout
(files/xformers/, files/smoke/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

FATBIN_MAGIC = 0xBA55ED50
FATBIN_KIND_PTX = 1
FATBIN_KIND_ELF = 2
# Entry flag bits seen in nvcc 13.0 output: arch-specific ("sm_90a") and family-specific ("sm_120f") code.
FLAG_ARCH_SPECIFIC = 0x100000
FLAG_FAMILY_SPECIFIC = 0x200000
FATBIN_SECTIONS = (".nv_fatbin", "__nv_relfatbin")
# cuobjdump lists a 200 MB _C.so in seconds; a hung one must not hold a build or a smoke test forever.
CUOBJDUMP_TIMEOUT_S = 120

_LIST_LINE = re.compile(r"^(ELF|PTX) file\s+\d+:\s+\S*?\.(sm_\d+[a-z]?)\.(?:cubin|ptx)\s*$")
_ARCH = re.compile(r"^(\d+)\.(\d)([af]?)$")


class FatbinError(ValueError):
    """The file is not an ELF we can read, or its fatbin section is malformed."""


@dataclass(frozen=True)
class DeviceCode:
    """Architectures with SASS (cubins) and with PTX in one library, each sorted and deduplicated."""

    cubins: tuple[str, ...] = field(default_factory=tuple)
    ptx: tuple[str, ...] = field(default_factory=tuple)


def _arch_key(sm: str) -> tuple[int, str]:
    digits = re.sub(r"\D", "", sm)
    return (int(digits) if digits else 0, sm)


def _sorted_unique(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted(set(names), key=_arch_key))


def parse_cuobjdump_listing(text: str) -> DeviceCode:
    """Read `cuobjdump --list-elf` (and/or `--list-ptx`) output: lines like `ELF file 1: _C.1.sm_120.cubin`."""
    cubins: list[str] = []
    ptx: list[str] = []
    for line in text.splitlines():
        match = _LIST_LINE.match(line.strip())
        if match:
            (cubins if match.group(1) == "ELF" else ptx).append(match.group(2))
    return DeviceCode(_sorted_unique(cubins), _sorted_unique(ptx))


def _elf_sections(data: bytes) -> dict[str, tuple[int, int]]:
    if data[:4] != b"\x7fELF":
        raise FatbinError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise FatbinError("only 64-bit little-endian ELF files are supported")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shoff == 0 or shnum == 0 or shoff + shnum * shentsize > len(data):
        raise FatbinError("ELF section header table missing or truncated")
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_offset = headers[shstrndx][4]
    sections: dict[str, tuple[int, int]] = {}
    for name_offset, _type, _flags, _addr, offset, size in headers:
        start = strtab_offset + name_offset
        name = data[start : data.index(b"\0", start)].decode("ascii", "replace")
        sections[name] = (offset, size)
    return sections


def parse_fatbin(blob: bytes) -> DeviceCode:
    """Read the architectures of every entry in a fatbin section (several containers may follow each other)."""
    cubins: list[str] = []
    ptx: list[str] = []
    offset = 0
    while offset + 16 <= len(blob):
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", blob, offset)
        if magic != FATBIN_MAGIC:
            # Containers are 8-byte aligned; skip the padding between them.
            offset += 8
            continue
        entry = offset + header_size
        end = entry + fat_size
        if end > len(blob):
            raise FatbinError(f"fatbin container at {offset:#x} runs past the section end")
        while entry + 48 <= end:
            kind, _ever, entry_header_size, payload_size = struct.unpack_from("<HHIQ", blob, entry)
            (arch,) = struct.unpack_from("<I", blob, entry + 28)
            (flags,) = struct.unpack_from("<Q", blob, entry + 40)
            if entry_header_size == 0:
                raise FatbinError(f"fatbin entry at {entry:#x} has a zero header size")
            # cuobjdump prints family-specific code as plain sm_XY, arch-specific as sm_XYa: follow it.
            name = f"sm_{arch}" + ("a" if flags & FLAG_ARCH_SPECIFIC else "")
            if kind == FATBIN_KIND_ELF:
                cubins.append(name)
            elif kind == FATBIN_KIND_PTX:
                ptx.append(name)
            entry += entry_header_size + payload_size
        offset = end
    return DeviceCode(_sorted_unique(cubins), _sorted_unique(ptx))


def read_elf_device_code(data: bytes) -> DeviceCode:
    """Device code of an ELF (shared library or object) read from its fatbin sections, without cuobjdump."""
    sections = _elf_sections(data)
    cubins: list[str] = []
    ptx: list[str] = []
    for name in FATBIN_SECTIONS:
        if name in sections:
            offset, size = sections[name]
            found = parse_fatbin(data[offset : offset + size])
            cubins += found.cubins
            ptx += found.ptx
    return DeviceCode(_sorted_unique(cubins), _sorted_unique(ptx))


def requested_cubins(arch_list: Sequence[str]) -> tuple[str, ...]:
    """sm names TORCH_CUDA_ARCH_LIST entries must produce cubins for: "12.0" -> sm_120, "9.0a" -> sm_90a, "8.6+PTX" -> sm_86."""
    names: list[str] = []
    for raw in arch_list:
        arch = raw.strip().removesuffix("+PTX")
        match = _ARCH.match(arch)
        if not match:
            raise ValueError(f"not a CUDA architecture like 12.0 or 9.0a: {raw!r}")
        major, minor, suffix = match.groups()
        names.append(f"sm_{major}{minor}{'a' if suffix == 'a' else ''}")
    return _sorted_unique(names)


def missing_cubins(code: DeviceCode, arch_list: Sequence[str]) -> tuple[str, ...]:
    return tuple(sm for sm in requested_cubins(arch_list) if sm not in code.cubins)


def find_cuobjdump(cuda_home: Optional[str]) -> Optional[str]:
    candidates = [os.path.join(cuda_home, "bin", "cuobjdump")] if cuda_home else []
    candidates += [p for p in [shutil.which("cuobjdump")] if p]
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def read_device_code(path: str, cuobjdump: Optional[str]) -> tuple[DeviceCode, str]:
    """Device code of `path` and the tool that read it ("cuobjdump" or "elf")."""
    if cuobjdump:
        text = ""
        for flag in ("--list-elf", "--list-ptx"):
            run = subprocess.run([cuobjdump, flag, path], capture_output=True, text=True, check=False,
                                 timeout=CUOBJDUMP_TIMEOUT_S)
            # cuobjdump exits non-zero for a list that is empty ("No PTX file found", "does not contain device code").
            if run.returncode != 0 and flag == "--list-elf" and "does not contain device code" not in run.stderr:
                raise FatbinError(f"{cuobjdump} {flag} {path} failed: {run.stderr.strip()}")
            text += run.stdout
        return parse_cuobjdump_listing(text), "cuobjdump"
    with open(path, "rb") as handle:
        return read_elf_device_code(handle.read()), "elf"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="List the cubin and PTX architectures of a CUDA library.")
    parser.add_argument("library", help="ELF shared library or object, e.g. xformers/_C.so")
    parser.add_argument("--cuobjdump", help="cuobjdump to use; default: $CUDA_HOME/bin or PATH, else read the ELF")
    parser.add_argument("--no-cuobjdump", action="store_true", help="always read the ELF's fatbin section")
    parser.add_argument("--require", default="", help="arch list (e.g. '9.0;12.0') that must each have a cubin")
    args = parser.parse_args(argv)
    tool = None if args.no_cuobjdump else (args.cuobjdump or find_cuobjdump(os.environ.get("CUDA_HOME")))
    try:
        code, reader = read_device_code(args.library, tool)
    except (OSError, FatbinError, subprocess.TimeoutExpired) as error:
        print(f"cubins: cannot read {args.library}: {error}", file=sys.stderr)
        return 2
    required = [a for a in re.split(r"[;,\s]+", args.require) if a]
    missing = missing_cubins(code, required)
    print(json.dumps({"library": args.library, "reader": reader, "cubins": code.cubins, "ptx": code.ptx,
                      "required": requested_cubins(required), "missing": missing}))
    if missing:
        print(f"cubins: {args.library} has no cubin for {', '.join(missing)} (found: {', '.join(code.cubins) or 'none'})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
