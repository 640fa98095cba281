"""Host-side facts. Each parser is a plain function (unit-tested on captured output); each fact turns bad output
into a FactProcessError, which fails that host alone, never the whole run."""

from __future__ import annotations

import re
import shlex
from typing import Any, Callable, NamedTuple

from pyinfra.api import FactBase
from pyinfra.api.exceptions import FactProcessError

NO_TOOL = "__GPUFLEET_NO_TOOL__"
WSL_NVIDIA_SMI = "/usr/lib/wsl/lib/nvidia-smi"
NVIDIA_VENDOR = "10de"
# Commands every stage relies on; "a/b" means either.
BASE_TOOLS = ("apt-get", "dpkg-query", "tar", "sha256sum", "su", "curl/wget")


class ParseError(ValueError):
    """Output that does not look like what the command prints."""


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
    sections = _sections(text)
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


def _sections(text: str) -> dict[str, str]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("== "):
            current = line[3:].strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return {k: "\n".join(v) for k, v in sections.items()}


class _ParsedFact(FactBase):
    """A fact whose output goes through a parser; a parse failure fails this host only."""

    parser: Callable[[str], Any]

    def process(self, output):
        try:
            return type(self).parser("\n".join(output))
        except (ParseError, ValueError, IndexError) as error:
            raise FactProcessError(f"{type(self).__name__}: {error}") from error


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


def parse_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


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

    parser = staticmethod(parse_lines)

    def default(self) -> list[str]:
        return []

    def command(self) -> str:
        return "apt-mark showhold"


class MissingTools(_ParsedFact):
    """Which of the commands gpufleet relies on are not installed."""

    parser = staticmethod(parse_lines)

    def default(self) -> list[str]:
        return []

    def command(self, tools: tuple[str, ...] = BASE_TOOLS) -> str:
        # "a/b" is satisfied by either command.
        checks = " ".join(tools)
        return (
            f"for t in {checks}; do ok=; for c in $(echo $t | tr '/' ' '); do "
            "command -v $c >/dev/null && ok=1; done; [ -n \"$ok\" ] || echo $t; done"
        )


class NvccVersion(_ParsedFact):
    """CUDA release reported by <cuda_home>/bin/nvcc, or None when it is not there."""

    parser = staticmethod(parse_nvcc_version)

    def command(self, cuda_home: str) -> str:
        return f"if [ -x {cuda_home}/bin/nvcc ]; then {cuda_home}/bin/nvcc --version; else echo {NO_TOOL}; fi"


class PythonVersion(_ParsedFact):
    """major.minor of an interpreter, or None when it does not exist."""

    parser = staticmethod(parse_python_version)

    def command(self, python: str) -> str:
        return (
            f"if [ -x {python} ]; then {python} -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'; "
            f"else echo {NO_TOOL}; fi"
        )


class PathOwner(_ParsedFact):
    """Owner of a path, or None when it does not exist."""

    parser = staticmethod(lambda text: None if NO_TOOL in text else text.strip())

    def command(self, path: str) -> str:
        return f"stat -c %U {path} 2>/dev/null || echo {NO_TOOL}"


def parse_torch_info(text: str) -> dict[str, Any] | None:
    """JSON printed by the venv's python about its torch; None when torch is not installed."""
    import json

    if NO_TOOL in text:
        return None
    last = text.strip().splitlines()[-1]
    info = json.loads(last)
    if not {"version", "cuda", "arch_list"} <= info.keys():
        raise ParseError(f"unexpected torch probe output: {last!r}")
    return info


TORCH_PROBE = (
    "import json, torch; print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda, "
    "'arch_list': torch.cuda.get_arch_list()}))"
)


TORCH_IMPORTABLE = "import torch; torch.__version__, torch.version.cuda, torch.cuda.get_arch_list"


class TorchInfo(_ParsedFact):
    """torch's version, CUDA version and compiled arch list in a venv; None when torch is not importable, or
    imports without its parts (a killed install leaves a directory Python imports as an empty namespace package)."""

    parser = staticmethod(parse_torch_info)

    def command(self, python: str) -> str:
        return (
            f"if [ -x {python} ] && {python} -c '{TORCH_IMPORTABLE}' 2>/dev/null; then "
            f'{python} -c "{TORCH_PROBE}"; else echo {NO_TOOL}; fi'
        )


class FileText(_ParsedFact):
    """A small text file's content, or None when it does not exist."""

    parser = staticmethod(lambda text: None if NO_TOOL in text else text.strip())

    def command(self, path: str) -> str:
        return f"cat {path} 2>/dev/null || echo {NO_TOOL}"


class PythonHeaders(_ParsedFact):
    """Whether an interpreter's Python.h is installed (needed to compile extensions)."""

    parser = staticmethod(lambda text: text.strip() == "yes")

    def command(self, python: str) -> str:
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
        name, sep, version = line.strip().partition("==")
        if sep:
            packages[re.sub(r"[-_.]+", "-", name).lower()] = version
    return packages


class PipFreeze(_ParsedFact):
    """What `python -m pip freeze --all` lists in an interpreter's environment (venvs without a pip script too)."""

    parser = staticmethod(parse_pip_freeze)

    def command(self, python: str) -> str:
        # None (like a missing interpreter) when pip itself is missing: a venv whose creation was killed.
        return (
            f"if [ -x {python} ] && {python} -m pip --version >/dev/null 2>&1; then {python} -m pip freeze --all; "
            f"else echo {NO_TOOL}; fi"
        )


class InterruptedPackageInstall(FactBase):
    """True when dpkg left work unfinished (a dropped connection mid-install): pending journal or half-installed."""

    def command(self) -> str:
        return "find /var/lib/dpkg/updates -type f | head -n 1; dpkg --audit 2>/dev/null || true"

    def process(self, output: list[str]) -> bool:
        return any(line.strip() for line in output)

    def default(self) -> bool:
        return False


class AptListsPresent(FactBase):
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

    def process(self, output: list[str]) -> bool:
        return "present" in output

    def default(self) -> bool:
        return False


class InitramfsStale(FactBase):
    """True when the running kernel's initramfs is older than a modprobe.d file that must be inside it."""

    def command(self, conf: str) -> str:
        return (
            'i="/boot/initrd.img-$(uname -r)"; '
            f'if command -v update-initramfs >/dev/null && [ -e "$i" ] && [ {shlex.quote(conf)} -nt "$i" ]; '
            "then echo stale; else echo ok; fi"
        )

    def process(self, output: list[str]) -> bool:
        return "stale" in output

    def default(self) -> bool:
        return False


class VenvState(FactBase):
    """A venv's health: "missing" (no interpreter), "no-pip" (a creation killed before ensurepip finished), or "ok"."""

    def command(self, python: str) -> str:
        quoted = shlex.quote(python)
        return (
            f"if [ ! -x {quoted} ] || ! {quoted} -c '' 2>/dev/null; then echo missing; "
            f"elif ! {quoted} -m pip --version >/dev/null 2>&1; then echo no-pip; else echo ok; fi"
        )

    def process(self, output: list[str]) -> str:
        value = "\n".join(output).strip()
        if value not in ("missing", "no-pip", "ok"):
            raise FactProcessError(f"VenvState: unexpected output {value!r}")
        return value
