"""Test-only pyinfra inventory: one `@fake/<profile>` host per tests/plan/profiles/*.yaml.

Each profile holds what the host's tools print and which paths exist; this file turns that into the stdout of each
command the deploys run to read facts, for pyinfra's fake connector (`fake_responses`: command substring -> stdout,
first match wins). Run from the repository root:
    pyinfra -y --dry --json tests/plan/fake_inventory.py deploys/full.py
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import yaml

import gpufleet as _gpufleet
from gpufleet.facts import BASE_TOOLS as _BASE_TOOLS
from gpufleet.facts import NO_TOOL
from gpufleet.facts import HostProbe as _HostProbe
from gpufleet.settings import load_settings, validate_value

_HERE = Path(__file__).resolve().parent
# A test may point this at a folder of its own profiles.
_PROFILES = Path(os.environ.get("GPUFLEET_PLAN_PROFILES", _HERE / "profiles"))
_CAPTURED = _HERE.parent / "data" / "captured"
# Both folders below are named per checkout, so test runs from two checkouts on one machine never wait on each
# other's locks.
_CHECKOUT = hashlib.sha256(str(_HERE).encode()).hexdigest()[:12]
# The control machine's wheel cache: a folder that holds no wheel unless a test puts one there, so no local build
# leaks in (outside the checkout: the xformers stage creates it to hold its lock file).
_WHEEL_CACHE = os.environ.get("GPUFLEET_PLAN_WHEEL_CACHE",
                              str(Path(tempfile.gettempdir()) / f"gpufleet-plan-no-wheel-cache-{_CHECKOUT}"))
# The control machine's report folder: a dry run creates it (files.get at prepare time), so keep it out of the checkout.
_REPORT_DIR = os.environ.get("GPUFLEET_PLAN_REPORT_DIR",
                             str(Path(tempfile.gettempdir()) / f"gpufleet-plan-reports-{_CHECKOUT}"))
_SCHEMA = load_settings()

# A test asks which gpufleet pyinfra's process imported (this checkout's, not an editable install elsewhere).
if os.environ.get("GPUFLEET_PLAN_WHICH_GPUFLEET"):
    Path(os.environ["GPUFLEET_PLAN_WHICH_GPUFLEET"]).write_text(str(Path(_gpufleet.__file__).resolve()))

# Every profile must say each of these; a missing one would silently read as "empty output".
_KEYS = (
    "description", "group", "settings", "control_machine", "os_release", "kernel_release", "wsl_nvidia_smi",
    "lspci", "nvidia_smi", "driver", "packages", "held", "missing_tools", "meminfo", "cpus", "df", "mokutil",
    "kernel_headers", "systemd", "python3", "interpreters", "venv", "nvcc", "files", "dpkg_interrupted",
)
_DRIVER_KEYS = ("proc", "modinfo", "runfile")
_VENV_KEYS = ("python", "headers", "owner", "torch", "pip_freeze")
# Tool lists the deploys ask MissingTools about: the base tools, and the xformers builder's (with/without ccache).
_TOOL_SETS = (_BASE_TOOLS, ("g++", "make", "patch"), ("g++", "make", "patch", "ccache"))
# dpkg-query patterns of DriverStateFact.
_DRIVER_PACKAGE = re.compile(r"^(nvidia-|libnvidia-|cuda-keyring$|linux-modules-nvidia-)")


class Answer(NamedTuple):
    fact: str  # the gpufleet fact class (or pyinfra fact) the key answers
    key: str  # substring of that fact's command
    stdout: str


def _text(value: Any) -> str:
    """A literal text, or {captured: NAME} for a file of tests/data/captured.

    Files written by scripts/capture-host-facts.sh end with the command's `rc=N` line: say {captured: NAME, rc: N}
    and that line is checked and dropped.
    """
    if isinstance(value, dict):
        text = (_CAPTURED / value["captured"]).read_text()
        if "rc" in value:
            lines = text.rstrip("\n").splitlines()
            if lines[-1] != f"rc={value['rc']}":
                raise ValueError(f"{value['captured']} ends with {lines[-1]!r}, not rc={value['rc']}")
            text = "\n".join(lines[:-1]) + "\n"
        return text
    return value or ""


def _file_text(value: Any, config: dict[str, Any]) -> str:
    """A file's content; {xformers_installed: [ARCH, ...]} is the stamp a finished xformers install of these
    settings leaves (its wheel fingerprint), so a profile says "installed by an earlier run" without a stale hash."""
    if isinstance(value, dict) and "xformers_installed" in value:
        from gpufleet.xformers_fleet import wheel_fingerprint

        return wheel_fingerprint(config, value["xformers_installed"])
    return _text(value)


def _directory(path: str, owner: str) -> str:
    """What pyinfra's Directory fact reads (stat) for an existing directory of owner, mode 755."""
    return f"user={owner} group={owner} mode=drwxr-xr-x atime=0 mtime=0 ctime=0 size=4096 '{path}'"


def effective_settings(profile: dict) -> dict[str, Any]:
    """The profile's settings over group_data/all.py's defaults (paths the facts are asked about)."""
    return {name: profile["settings"].get(name, s.default) for name, s in _SCHEMA.items()}


def _installed(profile: dict) -> list[tuple[str, str]]:
    """(package, version) of each installed package; `packages` holds `name version` lines."""
    return [tuple(line.split()[:2]) for line in _text(profile["packages"]).splitlines() if line.strip()]


def _python_version_command_key(python: str) -> str:
    return f"{python} -c 'import sys; print("


def fact_answers(profile: dict) -> list[Answer]:
    """Command substring -> stdout for every fact the deploys read, in lookup order (specific paths first)."""
    config = effective_settings(profile)
    lspci = profile["lspci"]
    pci = NO_TOOL if lspci is None else "\n".join(
        line for line in _text(lspci).splitlines() if "[10de:" in line.lower()
    )
    smi = profile["nvidia_smi"]
    smi_out = NO_TOOL if smi is None else f"{_text(smi['stdout'])}\nrc={smi['rc']}"
    driver = profile["driver"]
    mokutil = profile["mokutil"]
    kernel = _text(profile["kernel_release"]).strip()
    installed = _installed(profile)
    held = set(_text(profile["held"]).split())
    # dpkg's status of a held package is "hi", of any other installed one "ii".
    status = {name: "hi" if name in held else "ii" for name, _ in installed}
    dpkg_query = "\n".join(
        f"{name} {version} {status[name]} " for name, version in installed if _DRIVER_PACKAGE.match(name)
    )
    missing = set(profile["missing_tools"])
    busy = profile.get("busy") or {}
    running_headers = "yes" if profile["kernel_headers"] else "no"
    kernel_lines = [f"{kernel} headers={running_headers} nvidia={driver['modinfo'] or '-'}"]
    kernel_lines += [f"{k['release']} headers={'yes' if k['headers'] else 'no'} nvidia={k['nvidia'] or '-'}"
                     for k in profile.get("kernels", [])]
    meta = [name for name, _ in installed if re.match(r"^linux-(image|headers)-[a-z]", name)]
    answers = [
        Answer("InstalledKernels", "/boot/vmlinuz-*",
               f"== running\n{kernel}\n== kernels\n" + "\n".join(kernel_lines) + "\n== meta\n" + "\n".join(meta)),
        Answer("GpuBusy", "--query-compute-apps=",
               f"== apps\n{_text(busy.get('compute_apps', ''))}\n== uvm\n== who\n{_text(busy.get('who', ''))}"),
        Answer("OsInfo", "cat /etc/os-release", _text(profile["os_release"])),
        Answer("WslInfo", "/proc/sys/kernel/osrelease", f"{kernel}\nsmi={'yes' if profile['wsl_nvidia_smi'] else 'no'}"),
        Answer("NvidiaPciGpus", "lspci -nn", pci),
        Answer("NvidiaSmi", "--query-gpu=", smi_out),
        Answer(
            "DriverStateFact",
            "/proc/driver/nvidia/version",
            f"== proc\n{_text(driver['proc'])}\n== modinfo\n{driver['modinfo'] or ''}\n"
            f"== dpkg\n{dpkg_query}\n== runfile\n{'yes' if driver['runfile'] else 'no'}",
        ),
        Answer("MemoryInfo", "/proc/meminfo", f"{_text(profile['meminfo'])}\ncpus={profile['cpus']}"),
        Answer("FreeDisk", "df -Pk", _text(profile["df"])),
        Answer("SecureBoot", "mokutil", NO_TOOL if mokutil is None else _text(mokutil)),
        Answer("KernelHeaders", "/lib/modules/", f"{kernel}\n{'yes' if profile['kernel_headers'] else 'no'}"),
        Answer("HeldPackages", "apt-mark showhold", _text(profile["held"])),
        Answer("InterruptedPackageInstall", "find /var/lib/dpkg/updates", _text(profile["dpkg_interrupted"])),
        # A host with NVIDIA's keyring package has read the repository; a fresh one has no lists for it.
        Answer("AptListsPresent", "apt-get indextargets",
               "present" if any(name == "cuda-keyring" for name, _ in installed) else "missing"),
        Answer("InitramfsStale", "command -v update-initramfs >/dev/null && [ -e", "ok"),
    ]
    for tools in _TOOL_SETS:
        answers.append(
            Answer("MissingTools", f"for t in {' '.join(tools)}; do", "\n".join(t for t in tools if t in missing))
        )

    # Interpreters: /usr/bin/python3, the profile's others, and the venv's python when the venv exists.
    pythons: dict[str, dict] = {}
    if profile["python3"] is not None:
        pythons["/usr/bin/python3"] = {"version": profile["python3"], "headers": profile["python3_headers"]}
    pythons.update(profile["interpreters"])
    venv = profile["venv"]
    venv_python = f"{config['venv_path']}/bin/python"
    if venv is not None:
        pythons[venv_python] = {"version": venv["python"], "headers": venv["headers"]}
    for path, interpreter in pythons.items():
        answers.append(Answer("PythonVersion", _python_version_command_key(path), str(interpreter["version"])))
        answers.append(
            Answer("PythonHeaders", f"{path} -c 'import sysconfig", "yes" if interpreter["headers"] else "no")
        )
    if venv is not None:
        # torch_stamped: root's validated-state stamp matches, so the probe answers from it without importing torch.
        torch = _text(venv["torch"])
        heading = "== stamp" if venv.get("torch_stamped") else "== probed"
        answers.append(Answer("TorchInfo", f"{venv_python} -c 'import torch;", f"{heading}\n{torch}" if torch else NO_TOOL))
        answers.append(Answer("Directory", f"! (test -e {config['venv_path']} ||", _directory(config["venv_path"], venv["owner"])))
        answers.append(Answer("PipFreeze", f"{venv_python} -m pip freeze --all", _text(venv["pip_freeze"])))
        answers.append(Answer("InstalledDistributions", f"{venv_python} -I -c 'import importlib.metadata",
                              _text(venv["pip_freeze"])))
        answers.append(Answer("VenvState", f"{venv_python} -m pip --version >/dev/null 2>&1; then echo no-pip",
                              "ok" if _text(venv["pip_freeze"]).strip() else "no-pip"))
    for home, output in profile["nvcc"].items():
        answers.append(Answer("NvccVersion", f"{home}/bin/nvcc --version", _text(output)))
    for path, text in profile["files"].items():
        answers.append(Answer("FileContents", f"( test -e {path} && cat {path} )", _file_text(text, config)))
    # Optional: directories that exist already (root's, 755), for pyinfra's Directory fact.
    for path in profile.get("directories", []):
        answers.append(Answer("Directory", f"! (test -e {path} ||", _directory(path, "root")))

    # HostProbe runs the probes above in one command: their answers in its sections, looked up before them.
    answers.insert(0, Answer("HostProbe", "echo '=== os'", _host_probe(answers)))

    # Anything not listed above does not exist on the host: each fact's own "absent" answer (pyinfra's file facts
    # read the fake connector's default, no output, as absent).
    answers += [
        Answer("PythonVersion", "print(\"%d.%d\" % sys.version_info[:2])", NO_TOOL),
        Answer("PythonHeaders", "/Python.h", "no"),
        Answer("TorchInfo", "-c 'import torch;", NO_TOOL),
        Answer("PipFreeze", " -m pip freeze --all", NO_TOOL),
        Answer("InstalledDistributions", " -I -c 'import importlib.metadata", NO_TOOL),
        Answer("VenvState", "echo no-pip", "missing"),
        Answer("NvccVersion", "/bin/nvcc --version; else", NO_TOOL),
        # A tool list not in _TOOL_SETS: a tool name no deploy knows, so preflight or the build says so loudly.
        Answer("MissingTools(unlisted tool list)", "; do ok=; for c in", "FAKE-INVENTORY-HAS-NO-ANSWER-FOR-THIS-TOOL-LIST"),
        # pyinfra's own facts that tell a fresh host from a provisioned one.
        Answer("DebPackages", "dpkg -l", "\n".join(f"{status[n]}  {n}  {v}  amd64  (profile)" for n, v in installed)),
        Answer("HasSystemd", "test -d /run/systemd/system", "yes" if profile["systemd"] else "no"),
        # The fleet cache's facts, on a host that serves no cache yet: no service runs, devpi-server does not answer.
        Answer("SystemdServiceState", "systemctl show -P NeedDaemonReload", "no\ninactive"),
        Answer("DevpiMirrors", "curl -fsS -H 'Accept: application/json'", "root/pypi \nroot/pytorch "),
        # No private wheel index answers (curl -f prints nothing).
        Answer("DevpiIndexFiles", "/+simple/xformers/", ""),
        Answer("Os", "uname -s", "Linux"),
        # Symbolic links the build user planted in its tree ("path -> target" lines; optional, default none).
        Answer("PlantedLinks", '[ -L "$p" ] && printf', "\n".join(profile.get("planted_links", []))),
        # build_user does not exist yet: gpufleet creates it (pyinfra's server.user is planned as on a fresh host).
        Answer("Account", "getent passwd ", NO_TOOL),
        Answer("Which(useradd)", "command -v useradd", "/usr/sbin/useradd"),
        Answer("Which(curl)", "command -v curl", "" if "curl/wget" in missing else "/usr/bin/curl"),
        Answer("Which(wget)", "command -v wget", "" if "curl/wget" in missing else "/usr/bin/wget"),
    ]
    return answers


def _host_probe(answers: list[Answer]) -> str:
    """HostProbe's output from its parts' answers (the first answer of each part fact: the base tool list); two
    disks, as profile() asks about work_dir and venv_path."""
    first: dict[str, str] = {}
    for answer in answers:
        first.setdefault(answer.fact, answer.stdout)
    parts = [(name, first[cls.__name__]) for name, cls in _HostProbe.PARTS.items()]
    parts += [(f"disk{i}", first["FreeDisk"]) for i in range(2)]
    return "".join(f"=== {name}\n{stdout}\n=== rc 0\n" for name, stdout in parts)


def fact_outputs(profile: dict) -> dict[str, str]:
    """Command substring of each fact -> the stdout its shell command would print on this host (lookup order)."""
    outputs: dict[str, str] = {}
    for answer in fact_answers(profile):
        outputs.setdefault(answer.key, answer.stdout)
    return outputs


def load_profile(path: Path) -> dict:
    profile = yaml.safe_load(path.read_text())
    missing = [k for k in _KEYS if k not in profile] + [
        f"driver.{k}" for k in _DRIVER_KEYS if k not in (profile.get("driver") or {})
    ]
    if profile.get("python3") is not None and "python3_headers" not in profile:
        missing.append("python3_headers")
    for key in _VENV_KEYS:
        if profile.get("venv") is not None and key not in profile["venv"]:
            missing.append(f"venv.{key}")
    if missing:
        raise ValueError(f"{path}: profile lacks {', '.join(missing)}")
    unknown = sorted(set(profile["missing_tools"]) - {t for tools in _TOOL_SETS for t in tools})
    if unknown:
        raise ValueError(f"{path}: missing_tools names {', '.join(unknown)}, which no deploy asks about")
    for name, value in profile["settings"].items():
        if name not in _SCHEMA:
            raise ValueError(f"{path}: unknown setting {name}")
        expected = validate_value(name, value, _SCHEMA)
        if expected:
            raise ValueError(f"{path}: setting {name}: got {value!r}; expected {expected}")
    return profile


def _host(path: Path, profile: dict) -> tuple[str, dict]:
    data = {
        "wheel_cache_dir": _WHEEL_CACHE,
        "report_dir": _REPORT_DIR,
        **profile["settings"],
        "gpufleet_group": profile["group"],
        "fake_responses": fact_outputs(profile),
        "fake_delay": 0,
        "fake_delay_jitter": 0,
    }
    if profile["control_machine"]:
        # How gpufleet tells the machine running pyinfra: an address of its own.
        data["ssh_hostname"] = "localhost"
    return f"@fake/{path.stem}", data


_profiles = {path: load_profile(path) for path in sorted(_PROFILES.glob("*.yaml"))}

# One pyinfra group per gpufleet group, as in a real inventory.
workstations = [_host(path, p) for path, p in _profiles.items() if p["group"] == "workstations"]
wsl = [_host(path, p) for path, p in _profiles.items() if p["group"] == "wsl"]
