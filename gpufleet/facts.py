"""Host-side facts. Each parser is a plain function (unit-tested on captured output); every fact turns output it
cannot read into a FactProcessError naming the fact and the output, which fails that host alone, never the whole
run (pyinfra aborts the run for every host on any other exception in a fact)."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from typing import Any, Callable, NamedTuple

from packaging.utils import canonicalize_name
from pyinfra.api import FactBase
from pyinfra.api.exceptions import FactProcessError

NO_TOOL = "__GPUFLEET_NO_TOOL__"
WSL_NVIDIA_SMI = "/usr/lib/wsl/lib/nvidia-smi"
NVIDIA_VENDOR = "10de"
# Commands every stage relies on; "a/b" means either.
BASE_TOOLS = ("apt-get", "dpkg-query", "tar", "sha256sum", "su", "curl/wget")


class ParseError(ValueError):
    """Output that does not look like what the command prints."""


_OS_RELEASE_LINE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


class OsRelease(NamedTuple):
    id: str
    version_id: str
    codename: str
    pretty_name: str


class PciGpu(NamedTuple):
    slot: str
    device_id: str  # lowercase hex, e.g. "2b87"
    description: str


class SmiGpu(NamedTuple):
    name: str
    device_id: str  # lowercase hex
    compute_cap: str
    driver_version: str


class SmiResult(NamedTuple):
    available: bool
    gpus: tuple[SmiGpu, ...] = ()
    error: str = ""


class LoadedModule(NamedTuple):
    version: str
    open: bool


class DriverState(NamedTuple):
    loaded: LoadedModule | None
    on_disk_version: str | None
    packages: dict[str, str] = {}
    runfile: bool = False

    @property
    def mismatch(self) -> bool:
        """Loaded module differs from the one on disk: NVML says 'Driver/library version mismatch'."""
        return bool(self.loaded and self.on_disk_version and self.loaded.version != self.on_disk_version)


def parse_os_release(text: str) -> OsRelease:
    values: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip('"').strip("'")
    if "ID" not in values:
        raise ParseError("no ID= line in /etc/os-release")
    # os-release(5): blank lines, comments and KEY=value assignments only.
    for line in text.splitlines():
        if line.strip() and not line.startswith("#") and not _OS_RELEASE_LINE.match(line):
            raise ParseError(f"unexpected /etc/os-release line: {line!r}")
    return OsRelease(
        id=values["ID"],
        version_id=values.get("VERSION_ID", ""),
        codename=values.get("VERSION_CODENAME", ""),
        pretty_name=values.get("PRETTY_NAME", values["ID"]),
    )


def parse_wsl(text: str) -> dict[str, Any]:
    """Input: the kernel release line, then `smi=yes|no`."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 2 or not lines[1].startswith("smi="):
        raise ParseError(f"unexpected WSL probe output: {text!r}")
    kernel = lines[0]
    is_wsl = "microsoft-standard-wsl2" in kernel.lower()
    return {"kernel": kernel, "is_wsl": is_wsl, "nvidia_smi": lines[1] == "smi=yes"}


_LSPCI_LINE = re.compile(
    r"^(?P<slot>\S+)\s+(?P<cls>[^\[]*)\[(?P<class>[0-9a-f]{4})\]:\s+(?P<desc>.*?)\s*"
    r"\[(?P<vendor>[0-9a-f]{4}):(?P<device>[0-9a-f]{4})\]",
    re.IGNORECASE,
)
# VGA compatible controller and 3D controller; the GPU's audio function (0403) is not a GPU.
_DISPLAY_CLASSES = {"0300", "0302"}


def parse_lspci(text: str) -> list[PciGpu] | None:
    """NVIDIA display devices from `lspci -nn`; None when lspci is not installed."""
    if NO_TOOL in text:
        return None
    gpus = []
    for line in text.splitlines():
        match = _LSPCI_LINE.match(line.strip())
        if not match:
            if line.strip():
                raise ParseError(f"unexpected lspci line: {line!r}")
            continue
        if match["vendor"].lower() == NVIDIA_VENDOR and match["class"] in _DISPLAY_CLASSES:
            gpus.append(PciGpu(match["slot"], match["device"].lower(), match["desc"]))
    return gpus


def parse_nvidia_smi(text: str) -> SmiResult:
    """`nvidia-smi --query-gpu=name,pci.device_id,compute_cap,driver_version --format=csv,noheader`, then `rc=N`."""
    if NO_TOOL in text:
        return SmiResult(available=False)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not lines[-1].startswith("rc="):
        raise ParseError(f"unexpected nvidia-smi probe output: {text!r}")
    rc, body = lines[-1], lines[:-1]
    if rc != "rc=0":
        return SmiResult(available=True, error=" ".join(body) or f"nvidia-smi exited with {rc[3:]}")
    gpus = []
    for line in body:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4 or not re.match(r"^0x[0-9a-fA-F]{8}$", parts[1]):
            raise ParseError(f"unexpected nvidia-smi line: {line!r}")
        # pci.device_id is 0xDDDDVVVV: device id in the high half, vendor in the low half.
        gpus.append(SmiGpu(parts[0], parts[1][2:6].lower(), parts[2], parts[3]))
    return SmiResult(available=True, gpus=tuple(gpus))


_PROC_VERSION = re.compile(
    r"NVRM version: NVIDIA UNIX (?P<open>Open )?Kernel Module for \S+\s+(?P<version>\d+\.\d+(?:\.\d+)?)"
    r"|NVRM version: NVIDIA UNIX \S+ Kernel Module\s+(?P<version2>\d+\.\d+(?:\.\d+)?)"
)


def parse_proc_driver_version(text: str) -> LoadedModule | None:
    """/proc/driver/nvidia/version; None when no NVIDIA module is loaded (empty text)."""
    if not text.strip():
        return None
    match = _PROC_VERSION.search(text)
    if not match:
        raise ParseError(f"unexpected /proc/driver/nvidia/version: {text.splitlines()[0]!r}")
    if match["version"]:
        return LoadedModule(version=match["version"], open=bool(match["open"]))
    return LoadedModule(version=match["version2"], open=False)


def parse_dpkg_versions(text: str) -> dict[str, str]:
    """`dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\\n'`: installed packages only."""
    packages = {}
    for line in text.splitlines():
        parts = line.split()
        # "ii" installed, "hi" installed and held.
        if len(parts) >= 3 and parts[2][1:2] == "i":
            packages[parts[0]] = parts[1]
    return packages


def parse_driver_state(text: str) -> DriverState:
    """Sections written by DriverStateFact's command, each after a `== name` line."""
    sections = _sections(text, ("proc", "modinfo", "dpkg", "runfile"))
    on_disk = sections.get("modinfo", "").strip() or None
    if on_disk and not re.match(r"^\d+\.\d+(\.\d+)?$", on_disk):
        on_disk = None
    return DriverState(
        loaded=parse_proc_driver_version(sections.get("proc", "")),
        on_disk_version=on_disk,
        packages=parse_dpkg_versions(sections.get("dpkg", "")),
        runfile=sections.get("runfile", "").strip() == "yes",
    )


def parse_meminfo(text: str) -> dict[str, int]:
    """Bytes of MemTotal and MemAvailable, and the CPU count from a trailing `cpus=N` line."""
    values = {}
    for line in text.splitlines():
        if line.startswith("cpus="):
            values["cpus"] = int(line[5:])
            continue
        match = re.match(r"^(MemTotal|MemAvailable):\s+(\d+)\s+kB", line)
        if match:
            values[match[1]] = int(match[2]) * 1024
    if not {"MemTotal", "MemAvailable", "cpus"} <= values.keys():
        raise ParseError("meminfo lacks MemTotal, MemAvailable or the CPU count")
    return {"total": values["MemTotal"], "available": values["MemAvailable"], "cpus": values["cpus"]}


def parse_df(text: str) -> dict[str, Any]:
    """`df -Pk PATH`: the filesystem's free bytes and mount point."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        raise ParseError(f"unexpected df output: {text!r}")
    parts = lines[-1].split()
    if len(parts) < 6 or not parts[3].isdigit():
        raise ParseError(f"unexpected df line: {lines[-1]!r}")
    return {"free": int(parts[3]) * 1024, "mount": parts[5]}


def parse_secure_boot(text: str) -> bool | None:
    """`mokutil --sb-state`: True/False, or None when unknown (no mokutil, no EFI)."""
    lowered = text.lower()
    if "secureboot enabled" in lowered:
        return True
    if "secureboot disabled" in lowered or "not supported" in lowered or "doesn't support secure boot" in lowered:
        return False
    if NO_TOOL in text:
        return None
    raise ParseError(f"unexpected mokutil output: {text.strip()!r}")


def parse_kernel_headers(text: str) -> dict[str, Any]:
    lines = text.split()
    if len(lines) != 2 or lines[1] not in ("yes", "no"):
        raise ParseError(f"unexpected kernel headers probe output: {text!r}")
    return {"release": lines[0], "present": lines[1] == "yes"}


def _sections(text: str, names: tuple[str, ...]) -> dict[str, str]:
    """The text after each `== name` line; a command prints every one of `names`, so one missing is a cut output."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("== "):
            current = line[3:].strip()
            if current not in names or current in sections:
                raise ParseError(f"unexpected section {line!r}")
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif line.strip():
            raise ParseError(f"output before the first section: {line!r}")
    missing = [name for name in names if name not in sections]
    if missing:
        raise ParseError(f"no '== {missing[0]}' section")
    return {k: "\n".join(v) for k, v in sections.items()}


def _one_of(text: str, *answers: str) -> str:
    """A command's one-word answer; any other output is not what it prints."""
    value = text.strip()
    if value not in answers:
        raise ParseError(f"unexpected output {value!r}, expected {' or '.join(answers)}")
    return value


def _excerpt(output: list[str], limit: int = 600) -> str:
    text = "\n".join(output)
    return repr(text if len(text) <= limit else f"{text[:limit // 2]} [...] {text[-limit // 2:]}")


class _HostFact(FactBase):
    """A gpufleet fact: subclasses read their output in parse(). Any error there (a parser's ParseError, or an
    AttributeError on JSON of the wrong shape alike) becomes a FactProcessError that fails this host alone."""

    def process(self, output: list[str]) -> Any:
        try:
            return self.parse(output)
        except Exception as error:
            raise FactProcessError(f"{type(self).__name__}: {error}; output: {_excerpt(output)}") from error

    def parse(self, output: list[str]) -> Any:
        raise NotImplementedError


class _ParsedFact(_HostFact):
    """A fact whose output, as one text, goes through a parser function."""

    parser: Callable[[str], Any]

    def parse(self, output: list[str]) -> Any:
        return type(self).parser("\n".join(output))


class OsInfo(_ParsedFact):
    """The distribution from /etc/os-release."""

    parser = staticmethod(parse_os_release)

    def command(self) -> str:
        return "cat /etc/os-release"


class WslInfo(_ParsedFact):
    """Whether the host is WSL2 (kernel release) and has Windows' nvidia-smi."""

    parser = staticmethod(parse_wsl)

    def command(self) -> str:
        return f"cat /proc/sys/kernel/osrelease; if [ -x {WSL_NVIDIA_SMI} ]; then echo smi=yes; else echo smi=no; fi"


class NvidiaPciGpus(_ParsedFact):
    """NVIDIA display devices by PCI ID: `lspci -nn`, or the same fields read from sysfs where lspci is missing."""

    parser = staticmethod(parse_lspci)

    def default(self) -> list[PciGpu]:
        # No output at all: no NVIDIA device.
        return []

    def command(self) -> str:
        return (
            "if command -v lspci >/dev/null; then lspci -nn | grep -i '\\[10de:' || true; "
            "elif [ -d /sys/bus/pci/devices ]; then for d in /sys/bus/pci/devices/*; do "
            '[ "$(cat $d/vendor)" = 0x10de ] || continue; c=$(cut -c3-6 $d/class); '
            'echo "${d##*/} PCI device [$c]: sysfs [10de:$(cut -c3-6 $d/device)]"; done; '
            f"else echo {NO_TOOL}; fi"
        )


class NvidiaSmi(_ParsedFact):
    """What nvidia-smi reports (PATH, then WSL's location), or why it cannot."""

    parser = staticmethod(parse_nvidia_smi)

    def command(self) -> str:
        return (
            f"S=$(command -v nvidia-smi || {{ [ -x {WSL_NVIDIA_SMI} ] && echo {WSL_NVIDIA_SMI}; }}); "
            f'if [ -z "$S" ]; then echo {NO_TOOL}; else '
            '"$S" --query-gpu=name,pci.device_id,compute_cap,driver_version --format=csv,noheader 2>&1; '
            'echo "rc=$?"; fi'
        )


class DriverStateFact(_ParsedFact):
    """Loaded module, module on disk, installed driver packages, and a runfile install."""

    parser = staticmethod(parse_driver_state)

    def command(self) -> str:
        return (
            "echo '== proc'; cat /proc/driver/nvidia/version 2>/dev/null || true; "
            "echo '== modinfo'; modinfo -F version nvidia 2>/dev/null || true; "
            "echo '== dpkg'; dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\\n' "
            "'nvidia-*' 'libnvidia-*' 'cuda-keyring' 'linux-modules-nvidia-*' 2>/dev/null || true; "
            "echo '== runfile'; if [ -e /usr/bin/nvidia-uninstall ]; then echo yes; else echo no; fi"
        )


class MemoryInfo(_ParsedFact):
    """Total and available memory in bytes, and the CPU count."""

    parser = staticmethod(parse_meminfo)

    def command(self) -> str:
        return "cat /proc/meminfo; echo cpus=$(nproc)"


class FreeDisk(_ParsedFact):
    """Free bytes on the filesystem that holds path (or its nearest existing parent)."""

    parser = staticmethod(parse_df)

    def command(self, path: str) -> str:
        return f"p={shlex.quote(path)}; while [ ! -e \"$p\" ]; do p=$(dirname \"$p\"); done; df -Pk \"$p\""


class SecureBoot(_ParsedFact):
    """Secure Boot state from mokutil: True, False, or None when it cannot be told."""

    parser = staticmethod(parse_secure_boot)

    def command(self) -> str:
        return f"if command -v mokutil >/dev/null; then mokutil --sb-state 2>&1 || true; else echo {NO_TOOL}; fi"


class KernelHeaders(_ParsedFact):
    """The running kernel's release and whether its headers (for DKMS) are installed."""

    parser = staticmethod(parse_kernel_headers)

    def command(self) -> str:
        return 'r=$(uname -r); echo "$r"; if [ -d "/lib/modules/$r/build" ]; then echo yes; else echo no; fi'


def parse_names(text: str) -> list[str]:
    """One name a line (a package, `pkg:arch`, or a tool as `a/b`): anything else is not what the command prints."""
    names = [line.strip() for line in text.splitlines() if line.strip()]
    for name in names:
        if not _NAME.fullmatch(name):
            raise ParseError(f"unexpected line {name!r}, expected one name")
    return names


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_:/-]*")


def parse_nvcc_version(text: str) -> str | None:
    """The toolkit release from `nvcc --version` ("12.8"); None when nvcc is missing."""
    if NO_TOOL in text:
        return None
    match = re.search(r"release (\d+\.\d+)", text)
    if not match:
        raise ParseError(f"unexpected nvcc --version output: {text.strip()[-200:]!r}")
    return match[1]


def parse_python_version(text: str) -> str | None:
    """major.minor printed by the interpreter; None when it does not exist."""
    if NO_TOOL in text:
        return None
    value = text.strip()
    if not re.match(r"^\d+\.\d+$", value):
        raise ParseError(f"unexpected Python version output: {value!r}")
    return value


class HeldPackages(_ParsedFact):
    """Packages apt-mark holds."""

    parser = staticmethod(parse_names)

    def default(self) -> list[str]:
        return []

    def command(self) -> str:
        return "apt-mark showhold"


class MissingTools(_ParsedFact):
    """Which of the commands gpufleet relies on are not installed."""

    parser = staticmethod(parse_names)

    def default(self) -> list[str]:
        return []

    def command(self, tools: tuple[str, ...] = BASE_TOOLS) -> str:
        # "a/b" is satisfied by either command.
        checks = " ".join(tools)
        return (
            f"for t in {checks}; do ok=; for c in $(echo $t | tr '/' ' '); do "
            "command -v $c >/dev/null && ok=1; done; [ -n \"$ok\" ] || echo $t; done"
        )


class HostProbe(_HostFact):
    """Preflight's probes in one round trip: each part is the command of one fact above, in its own section, read
    by that fact's parser, so a host is described by one command instead of ten."""

    PARTS: dict[str, type[_HostFact]] = {
        "os": OsInfo,
        "wsl": WslInfo,
        "pci": NvidiaPciGpus,
        "smi": NvidiaSmi,
        "mem": MemoryInfo,
        "driver": DriverStateFact,
        "secure_boot": SecureBoot,
        "tools": MissingTools,
    }

    def command(self, disk_paths: tuple[str, ...]) -> str:
        parts = [(name, cls().command()) for name, cls in self.PARTS.items()]
        parts += [(f"disk{i}", FreeDisk().command(path)) for i, path in enumerate(disk_paths)]
        return " ".join(f"echo '=== {name}'; ( {command} ); echo \"=== rc $?\";" for name, command in parts)

    def parse(self, output: list[str]) -> dict[str, Any]:
        """name -> that fact's answer (its default for no output); "disks" lists FreeDisk's answers in order."""
        sections: dict[str, list[str]] = {}
        answers: dict[str, Any] = {"disks": []}
        current = None
        for line in output:
            if line.startswith("=== rc "):
                if current is None or line[7:].strip() != "0":
                    raise ParseError(f"the {current} probe failed ({line[4:].strip()})")
                cls = FreeDisk if current.startswith("disk") else self.PARTS[current]
                lines = sections[current]
                try:
                    answer = cls().parse(lines) if any(line.strip() for line in lines) else cls().default()
                except Exception as error:
                    raise ParseError(f"the {current} section ({cls.__name__}): {error}") from error
                if current.startswith("disk"):
                    answers["disks"].append(answer)
                else:
                    answers[current] = answer
                current = None
            elif line.startswith("=== ") and current is None:
                current = line[4:].strip()
                if current not in self.PARTS and not re.fullmatch(r"disk\d+", current):
                    raise ParseError(f"unexpected section {current!r}")
                sections[current] = []
            elif current is not None:
                sections[current].append(line)
            elif line.strip():
                raise ParseError(f"output outside a section: {line!r}")
        missing = [name for name in self.PARTS if name not in answers]
        if current is not None or missing:
            raise ParseError(f"output ends early (missing {current or missing[0]})")
        return answers


class NvccVersion(_ParsedFact):
    """CUDA release reported by <cuda_home>/bin/nvcc, or None when it is not there."""

    parser = staticmethod(parse_nvcc_version)

    def command(self, cuda_home: str) -> str:
        nvcc = shlex.quote(f"{cuda_home}/bin/nvcc")
        return f"if [ -x {nvcc} ]; then {nvcc} --version; else echo {NO_TOOL}; fi"


class PythonVersion(_ParsedFact):
    """major.minor of an interpreter, or None when it does not exist."""

    parser = staticmethod(parse_python_version)

    def command(self, python: str) -> str:
        python = shlex.quote(python)
        return (
            f"if [ -x {python} ]; then {python} -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'; "
            f"else echo {NO_TOOL}; fi"
        )


def parse_torch_info(text: str) -> dict[str, Any] | None:
    """JSON about the venv's torch, after `== stamp` (read from the validated-state stamp) or `== probed` (torch
    imported just now); None when torch is not installed. `stamped` says which."""
    if NO_TOOL in text:
        return None
    lines = text.strip().splitlines()
    if not lines:
        raise ParseError("no torch probe output")
    last = lines[-1]
    info = json.loads(last)
    if not (isinstance(info, dict) and isinstance(info.get("version"), str)
            and isinstance(info.get("cuda"), (str, type(None))) and isinstance(info.get("arch_list"), list)):
        raise ParseError(f"unexpected torch probe output: {last!r}")
    return {**info, "stamped": "== stamp" in lines[:-1]}


TORCH_PROBE = (
    "import json, torch; print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda, "
    "'arch_list': torch.cuda.get_arch_list()}))"
)
# Root's own record of validated states, out of reach of the build user who owns the venv.
STATE_DIR = "/var/lib/gpufleet-state"


def torch_stamp_path(python: str) -> str:
    """Where root keeps the validated torch state of the venv whose interpreter is `python`."""
    return f"{STATE_DIR}/torch-{hashlib.sha256(python.encode()).hexdigest()[:16]}"


def torch_state_key_command(python: str, context: str) -> str:
    """Shell that prints the key of the venv's torch state: torch's dist-info RECORD (hash, size, mtime, inode),
    the torch package and library folders (mtime: a file added or removed), the venv's interpreter (real path,
    size, mtime) and `context` (the host's GPU PCI IDs and driver version). Any change makes a new key."""
    venv = shlex.quote(python.rsplit("/bin/", 1)[0])
    return (
        f"{{ v={venv}; for r in \"$v\"/lib/python*/site-packages/torch-*.dist-info/RECORD; do "
        'sha256sum "$r"; t="${r%/torch-*}/torch"; stat -c "%n %s %Y %i" "$r" "$t" "$t/lib"; done; '
        f"readlink -f {shlex.quote(python)}; stat -L -c '%s %Y %i' {shlex.quote(python)}; "
        f"echo {shlex.quote(context)}; }} 2>&1 | sha256sum | cut -c1-64"
    )


def torch_stamp_trusted_test(stamp: str) -> str:
    """Shell test: the stamp and its folder are root's (folder mode 700), neither a symlink."""
    return (
        f'[ ! -L {STATE_DIR} ] && [ "$(stat -c %u:%a {STATE_DIR} 2>/dev/null)" = 0:700 ] && '
        f'[ -f {stamp} ] && [ ! -L {stamp} ] && [ "$(stat -c %u {stamp})" = 0 ]'
    )


TORCH_IMPORTABLE = "import torch; torch.__version__, torch.version.cuda, torch.cuda.get_arch_list"


class TorchInfo(_ParsedFact):
    """torch's version, CUDA version and compiled arch list in a venv; None when torch is not importable, or
    imports without its parts (a killed install leaves a directory Python imports as an empty namespace package).

    Importing torch takes seconds, so the answer comes from root's stamp while the venv's torch, interpreter, GPUs
    and driver are those the stamp was validated with (its key, torch_state_key_command); otherwise torch is
    imported again (`stamped` False) and the torch stage records the new state.
    """

    parser = staticmethod(parse_torch_info)

    def command(self, python: str, context: str = "") -> str:
        stamp = torch_stamp_path(python)
        quoted = shlex.quote(python)
        return (
            f"k=$({torch_state_key_command(python, context)}); "
            f'if {torch_stamp_trusted_test(stamp)} && [ "$(head -n 1 {stamp})" = "$k" ]; then '
            f"echo '== stamp'; sed -n 2p {stamp}; "
            f"elif [ -x {quoted} ] && {quoted} -c '{TORCH_IMPORTABLE}' 2>/dev/null; then "
            f'echo \'== probed\'; {quoted} -c "{TORCH_PROBE}"; else echo {NO_TOOL}; fi'
        )


def record_torch_state_command(python: str, context: str) -> str:
    """Shell, run as root after torch was validated: write the stamp (key line, then TorchInfo's JSON)."""
    stamp = torch_stamp_path(python)
    return (
        f"install -d -m 700 -o root -g root {STATE_DIR} && "
        f"k=$({torch_state_key_command(python, context)}) && "
        f'j=$({shlex.quote(python)} -c "{TORCH_PROBE}" | tail -n 1) && '
        f"(umask 077; printf '%s\\n%s\\n' \"$k\" \"$j\" > {stamp}.new) && mv -f {stamp}.new {stamp}"
    )


class PythonHeaders(_ParsedFact):
    """Whether an interpreter's Python.h is installed (needed to compile extensions)."""

    parser = staticmethod(lambda text: _one_of(text, "yes", "no") == "yes")

    def command(self, python: str) -> str:
        python = shlex.quote(python)
        return (
            f"if [ -x {python} ] && [ -f \"$({python} -c 'import sysconfig; print(sysconfig.get_paths()[\"include\"])')"
            '/Python.h" ]; then echo yes; else echo no; fi'
        )


def parse_pip_freeze(text: str) -> dict[str, str] | None:
    """Normalised project name -> version from `pip freeze --all`; None when the interpreter is missing."""
    if NO_TOOL in text:
        return None
    packages = {}
    for line in text.splitlines():
        line = line.strip()
        name, sep, version = line.partition("==")
        if sep:
            packages[canonicalize_name(name)] = version
        # pip freeze's other lines: "name @ url" (a direct reference), "-e ..." (editable) and comments.
        elif line and not (_DIRECT_REFERENCE.match(line) or line.startswith(("-e ", "#"))):
            raise ParseError(f"unexpected pip freeze line: {line!r}")
    return packages


_DIRECT_REFERENCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]* @ \S+")


class PipFreeze(_ParsedFact):
    """What `python -m pip freeze --all` lists in an interpreter's environment (venvs without a pip script too)."""

    parser = staticmethod(parse_pip_freeze)

    def command(self, python: str) -> str:
        # None (like a missing interpreter) when pip itself is missing: a venv whose creation was killed.
        python = shlex.quote(python)
        return (
            f"if [ -x {python} ] && {python} -m pip --version >/dev/null 2>&1; then {python} -m pip freeze --all; "
            f"else echo {NO_TOOL}; fi"
        )


_DISTRIBUTIONS = (
    'import importlib.metadata as m; print("\\n".join(sorted("%s==%s" % (d.metadata["Name"], d.version) '
    'for d in m.distributions() if d.metadata["Name"])))'
)


class InstalledDistributions(_ParsedFact):
    """The distributions installed in an interpreter's environment, as `pip freeze --all` names them.

    In a venv they are read from the names of its site-packages' dist-info folders: no Python starts, so root runs
    nothing from a venv the build user can write, and a no-op costs each host a few milliseconds. Elsewhere (a
    root-owned interpreter, or a venv that also sees the system's packages) importlib.metadata lists them, a tenth
    of the time of starting pip.
    """

    parser = staticmethod(parse_pip_freeze)

    def command(self, python: str) -> str:
        python = shlex.quote(python)
        # Wheel installs name the folder <name>-<version>.dist-info with "-" escaped in both parts (PEP 427).
        listed = ('for d in "$v"/lib/python*/site-packages/*.dist-info; do [ -d "$d" ] || continue; '
                  'b=${d##*/}; b=${b%.dist-info}; echo "${b%%-*}==${b#*-}"; done')
        return (f"if [ ! -x {python} ]; then echo {NO_TOOL}; "
                f'else v=$(dirname "$(dirname {python})"); '
                f'if [ -f "$v/pyvenv.cfg" ] && ! grep -qiE "^include-system-site-packages *= *true" "$v/pyvenv.cfg"; '
                f"then {listed}; "
                f"else {python} -I -c {shlex.quote(_DISTRIBUTIONS)}; fi; fi")


class InterruptedPackageInstall(_HostFact):
    """True when dpkg left work unfinished (a dropped connection mid-install): pending journal or half-installed."""

    def command(self) -> str:
        return "find /var/lib/dpkg/updates -type f | head -n 1; dpkg --audit 2>/dev/null || true"

    def parse(self, output: list[str]) -> bool:
        # Any output at all (a journal file, dpkg's free-text report) is unfinished work.
        return any(line.strip() for line in output)

    def default(self) -> bool:
        return False


def parse_account(text: str) -> dict[str, Any] | None:
    """`getent passwd USER` then `id -Gn USER`: the account's uid, home and groups; None when there is none."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or NO_TOOL in lines[0]:
        return None
    fields = lines[0].split(":")
    if len(fields) != 7 or not fields[2].isdigit():
        raise ParseError(f"unexpected getent passwd line: {lines[0]!r}")
    groups = lines[1].split() if len(lines) > 1 else []
    return {"name": fields[0], "uid": int(fields[2]), "home": fields[5], "shell": fields[6], "groups": groups}


class Account(_ParsedFact):
    """An existing account (uid, home, groups), or None: preflight refuses a build_user that is someone else's."""

    parser = staticmethod(parse_account)

    def command(self, user: str) -> str:
        user = shlex.quote(user)
        return f"getent passwd {user} && id -Gn {user} || echo {NO_TOOL}"


class PlantedLinks(_HostFact):
    """Symbolic links among paths root writes to or reads in the build user's tree ("path -> target" each).

    gpufleet makes no links there: one found was planted, and root must not follow it.
    """

    def command(self, paths: list[str], trees: list[str] = ()) -> str:
        checks = " ".join(shlex.quote(p) for p in paths)
        finds = "".join(f"[ -d {shlex.quote(t)} ] && [ ! -L {shlex.quote(t)} ] && "
                        f"find {shlex.quote(t)} -mindepth 1 -type l -printf '%p -> %l\\n'; " for t in trees)
        return (f'for p in {checks}; do [ -L "$p" ] && printf \'%s -> %s\\n\' "$p" "$(readlink -- "$p")"; done; '
                f"{finds}true")

    def parse(self, output: list[str]) -> list[str]:
        links = [line.strip() for line in output if line.strip()]
        for link in links:
            # A name with a newline in it breaks a line in two: refused like any other unreadable output.
            if " -> " not in link:
                raise ParseError(f"unexpected line {link!r}, expected 'path -> target'")
        return links

    def default(self) -> list[str]:
        return []


class GpuUser(NamedTuple):
    pid: str
    name: str


class BusyState(NamedTuple):
    """What a reboot would interrupt: GPU compute processes and logged-in users."""

    compute: list[GpuUser]
    users: list[str]


def parse_busy(text: str) -> BusyState:
    """Sections of GpuBusy's command: `== apps` (nvidia-smi's "pid, process_name" CSV), `== uvm` ("pid comm" of
    processes holding /dev/nvidia-uvm, which every CUDA process opens), `== who` (who's output)."""
    sections = _sections(text, ("apps", "uvm", "who"))
    compute: dict[str, GpuUser] = {}
    for line in sections.get("apps", "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0].isdigit():
            compute.setdefault(parts[0], GpuUser(parts[0], parts[1].rsplit("/", 1)[-1]))
    for line in sections.get("uvm", "").splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].isdigit():
            compute.setdefault(parts[0], GpuUser(parts[0], parts[1].strip()))
    users = sorted({line.split()[0] for line in sections.get("who", "").splitlines() if line.split()})
    return BusyState(sorted(compute.values(), key=lambda g: int(g.pid)), users)


class GpuBusy(_ParsedFact):
    """GPU compute processes (nvidia-smi --query-compute-apps, and /dev/nvidia-uvm holders for when nvidia-smi cannot
    answer, as during a driver/library mismatch) and logged-in users (who)."""

    parser = staticmethod(parse_busy)

    def command(self) -> str:
        return (
            "echo '== apps'; nvidia-smi --query-compute-apps=pid,process_name --format=csv,noheader 2>/dev/null "
            "|| true; echo '== uvm'; for d in /proc/[0-9]*; do "
            "if ls -l \"$d/fd\" 2>/dev/null | grep -q ' /dev/nvidia-uvm$'; then "
            "echo \"${d#/proc/} $(cat \"$d/comm\" 2>/dev/null)\"; fi; done; "
            "echo '== who'; who 2>/dev/null || true"
        )


_KERNEL_RELEASE = re.compile(r"^[0-9][A-Za-z0-9._+~-]*$")


class InstalledKernel(NamedTuple):
    release: str
    running: bool
    headers: bool  # /lib/modules/<release>/build exists (DKMS can build for it)
    nvidia: str | None  # version of the NVIDIA module this kernel would load, None when it has none


class KernelState(NamedTuple):
    kernels: list[InstalledKernel]
    # Installed kernel metapackages without a version in their name (linux-image-generic-hwe-24.04, ...).
    metapackages: list[str]


def parse_kernels(text: str) -> KernelState:
    """Sections of InstalledKernels' command: `== running` (uname -r), `== kernels` ("<release> headers=yes|no
    nvidia=<version>|-" per kernel), `== meta` (installed linux-image-*/linux-headers-* metapackages)."""
    sections = _sections(text, ("running", "kernels", "meta"))
    running = sections.get("running", "").strip()
    if not _KERNEL_RELEASE.match(running):
        raise ParseError(f"unexpected kernel release {running!r}")
    kernels = []
    for line in sections.get("kernels", "").splitlines():
        match = re.match(r"^(\S+) headers=(yes|no) nvidia=(\S+)$", line.strip())
        if not match or not _KERNEL_RELEASE.match(match[1]):
            raise ParseError(f"unexpected kernel line {line!r}")
        version = match[3] if re.match(r"^\d+\.\d+(\.\d+)?$", match[3]) else None
        kernels.append(InstalledKernel(match[1], match[1] == running, match[2] == "yes", version))
    if not any(k.running for k in kernels):
        raise ParseError(f"the running kernel {running} is not in the kernel list")
    names = {m.strip() for m in sections.get("meta", "").splitlines()}
    meta = sorted(m for m in names if re.match(r"^linux-(image|headers)-[a-z][a-z0-9.+-]*$", m))
    return KernelState(kernels, meta)


class InstalledKernels(_ParsedFact):
    """Each installed kernel (the running one and every /boot/vmlinuz-*): its headers and its NVIDIA module; and the
    kernel metapackages installed, which name the flavour (generic, generic-hwe-24.04, lowlatency, ...)."""

    parser = staticmethod(parse_kernels)

    def command(self) -> str:
        return (
            "echo '== running'; uname -r; echo '== kernels'; "
            "{ uname -r; for f in /boot/vmlinuz-*; do [ -e \"$f\" ] && echo \"${f#/boot/vmlinuz-}\"; done; } "
            "| sort -u | "
            "while read -r k; do h=no; [ -e \"/lib/modules/$k/build\" ] && h=yes; "
            "v=$(modinfo -k \"$k\" -F version nvidia 2>/dev/null | head -n 1); echo \"$k headers=$h nvidia=${v:--}\"; "
            "done; echo '== meta'; dpkg-query -W -f='${Package} ${db:Status-Abbrev}\\n' 'linux-image-*' "
            "'linux-headers-*' 2>/dev/null "
            "| awk '$2 ~ /^.i/ && $1 !~ /^linux-(image|headers)-[0-9]/ {print $1}' || true"
        )


class AptListsPresent(_HostFact):
    """Whether apt holds a Packages list for a repository URI (what `apt update` writes once it read the repo).

    A list's mtime is the server's Last-Modified, not when it was fetched, so it cannot be compared with the
    source file's; a source written by a run killed before `apt update` shows as a repository without lists.
    """

    def command(self, uri: str) -> str:
        return (
            "f=$(apt-get indextargets --format '$(FILENAME)' "
            f"{shlex.quote('Repo-URI: ' + uri)} 'Created-By: Packages' 2>/dev/null | head -n 1); "
            'if [ -n "$f" ] && ls "$f"* >/dev/null 2>&1; then echo present; else echo missing; fi'
        )

    def parse(self, output: list[str]) -> bool:
        return _one_of("\n".join(output), "present", "missing") == "present"

    def default(self) -> bool:
        return False


class InitramfsStale(_HostFact):
    """True when the running kernel's initramfs is older than a modprobe.d file that must be inside it."""

    def command(self, conf: str) -> str:
        return (
            'i="/boot/initrd.img-$(uname -r)"; '
            f'if command -v update-initramfs >/dev/null && [ -e "$i" ] && [ {shlex.quote(conf)} -nt "$i" ]; '
            "then echo stale; else echo ok; fi"
        )

    def parse(self, output: list[str]) -> bool:
        return _one_of("\n".join(output), "stale", "ok") == "stale"

    def default(self) -> bool:
        return False


class VenvState(_HostFact):
    """A venv's health: "missing" (no interpreter), "no-pip" (a creation killed before ensurepip finished), or "ok"."""

    def command(self, python: str) -> str:
        quoted = shlex.quote(python)
        return (
            f"if [ ! -x {quoted} ] || ! {quoted} -c '' 2>/dev/null; then echo missing; "
            f"elif ! {quoted} -m pip --version >/dev/null 2>&1; then echo no-pip; else echo ok; fi"
        )

    def parse(self, output: list[str]) -> str:
        return _one_of("\n".join(output), "missing", "no-pip", "ok")


class HasSystemd(_HostFact):
    """Whether systemd is PID 1 (sd_booted(3)'s test; false under WSL without `systemd=true` in /etc/wsl.conf)."""

    def command(self) -> str:
        return "test -d /run/systemd/system && echo yes || echo no"

    def parse(self, output: list[str]) -> bool:
        return _one_of("\n".join(output), "yes", "no") == "yes"


class ServiceState(NamedTuple):
    reload: bool  # the unit file changed since systemd last read it (a daemon-reload is due)
    stale: bool  # the service runs, but started before one of the files it reads was last written


class SystemdServiceState(_HostFact):
    """Whether a systemd service runs older settings than the host has: its unit file changed without a
    daemon-reload, or one of `paths` was written after the service last became active (seconds resolution).
    A run cut off between writing a file and restarting the service leaves this state; the next run repairs it."""

    def command(self, unit: str, paths: list[str]) -> str:
        u = shlex.quote(unit)
        files = " ".join(shlex.quote(p) for p in paths)
        return (
            f"systemctl show -P NeedDaemonReload {u}; "
            f"since=$(systemctl show -P ActiveEnterTimestamp {u}); "
            f'if [ "$(systemctl is-active {u})" != active ] || [ -z "$since" ]; then echo inactive; exit 0; fi; '
            f'since=$(date -d "$since" +%s); '
            f'for f in {files}; do if [ -e "$f" ] && [ "$(stat -c %Y "$f")" -gt "$since" ]; then '
            "echo stale; exit 0; fi; done; echo current"
        )

    def parse(self, output: list[str]) -> ServiceState:
        lines = [line.strip() for line in output if line.strip()]
        if len(lines) != 2:
            raise ParseError(f"expected NeedDaemonReload and a state, got {lines!r}")
        reload = _one_of(lines[0], "yes", "no") == "yes"
        return ServiceState(reload, _one_of(lines[1], "inactive", "current", "stale") == "stale")


_DEVPI_INDEX = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")


class DevpiMirrors(_HostFact):
    """devpi index -> its mirror_url, read from a running devpi-server; {} when it does not answer."""

    def command(self, base: str, indexes: list[str]) -> str:
        reads = " ; ".join(
            f"printf '%s ' {shlex.quote(i)}; curl -fsS -H 'Accept: application/json' {shlex.quote(f'{base}/{i}')} "
            "| tr -d '\\n'; echo"
            for i in indexes)
        return f"( {reads} ) 2>/dev/null || true"

    def parse(self, output: list[str]) -> dict[str, str]:
        found = {}
        for line in output:
            if not line.strip():
                continue
            index, _, body = line.partition(" ")
            if not _DEVPI_INDEX.fullmatch(index):
                raise ParseError(f"unexpected line {line!r}, expected '<user>/<index> <devpi's JSON>'")
            try:
                result = json.loads(body)["result"]
                found[index] = (result.get("mirror_url", "") if result.get("type") == "mirror"
                                else _private_index_state(result))
            except (ValueError, KeyError, TypeError, AttributeError):
                # No answer, or a cut one (a server starting or stopping): the index is set up again.
                continue
        return found


def _private_index_state(result: dict) -> str:
    """How a devpi stage index reads in DevpiMirrors: cache.WHEEL_INDEX_STATE when it inherits nothing, keeps
    every upload (not volatile) and takes uploads from the upload user alone; otherwise what it is."""
    # Imported here: gpufleet.cache imports gpufleet.decide, which imports this module.
    from gpufleet.cache import WHEEL_INDEX_STATE, WHEEL_UPLOADER

    if result["bases"] == [] and result["volatile"] is False and result["acl_upload"] == [WHEEL_UPLOADER]:
        return WHEEL_INDEX_STATE
    return (f"{result['type']} bases={result['bases']} volatile={result['volatile']} "
            f"acl_upload={result['acl_upload']}")


class DevpiIndexFiles(_HostFact):
    """xformers wheel file name -> sha256 on a devpi index's simple page (cache.index_files); {} when the index,
    the project or the server is not there."""

    def command(self, index_url: str) -> str:
        return f"curl -fsS {shlex.quote(index_url + '/+simple/xformers/')} 2>/dev/null || true"

    def parse(self, output: list[str]) -> dict[str, str]:
        from gpufleet.cache import index_files

        page = "\n".join(output)
        if not page.strip():
            return {}
        if not re.search(r"<title>[^<]*links for xformers</title>", page):
            raise ParseError("not devpi's simple page of the project xformers")
        return index_files(page)
