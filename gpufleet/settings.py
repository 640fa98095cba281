"""The settings schema: read from group_data/all.py (names, types, defaults, comments) so it lives in one place."""

from __future__ import annotations

import ast
import difflib
import ipaddress
import posixpath
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from packaging.version import InvalidVersion, Version

from gpufleet.buildplan import ROOT_STATE_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent
ALL_SETTINGS_FILE = REPO_ROOT / "group_data" / "all.py"

# Every pattern is applied with fullmatch and ASCII only ([0-9], not \d): a trailing newline or a non-ASCII digit
# never passes.
_BRANCH = re.compile(r"[1-9][0-9]{2}")
_CUDA_VERSION = re.compile(r"1[1-9]\.[0-9]")
_PYTHON_VERSION = re.compile(r"3\.(?:9|1[0-9])")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ARCH = re.compile(r"[1-9][0-9]?\.[0-9][af]?(?:\+PTX)?")
_REPO_DIR = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
# Host-side paths: letters, digits and . _ + - / only, so no shell, apt or INI syntax can hide in them.
_PATH = re.compile(r"/[A-Za-z0-9._+/-]*")
# Control-machine paths (wheel cache, reports, patches): may be relative; still no whitespace or control characters.
_LOCAL_PATH = re.compile(r"[A-Za-z0-9._+/~-][A-Za-z0-9._+/~@=,-]*")
# URL characters: RFC 3986's, less the shell's and apt-cacher-ng's syntax (; $ ' " ` \\ ( ) * and spaces).
_URL = re.compile(r"[A-Za-z0-9._~:/?#@!&+,=%\[\]-]+")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens, 253 characters at most.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PRINTABLE = re.compile(r"[!-~]*")

# Directories that gpufleet never takes over as work_dir, venv_path or cache_dir (it would chown or chmod them).
SYSTEM_DIRS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/lost+found", "/media",
    "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/snap", "/srv", "/sys", "/tmp", "/usr", "/var",
    "/usr/bin", "/usr/include", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/libexec", "/usr/local",
    "/usr/local/bin", "/usr/local/lib", "/usr/local/sbin", "/usr/local/share", "/usr/sbin", "/usr/share",
    "/usr/src", "/var/backups", "/var/cache", "/var/lib", "/var/local", "/var/log", "/var/mail", "/var/opt",
    "/var/spool", "/var/tmp", "/var/www", "/etc/apt", "/etc/systemd", "/etc/cron.d", "/etc/sudoers.d",
})
# Trees nothing of gpufleet's may live in: virtual filesystems, and world-writable ones where others plant links.
FORBIDDEN_TREES = ("/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/boot", "/etc", "/root")
# Accounts a base Debian or Ubuntu system already has; build_user must be an account of its own.
SYSTEM_ACCOUNTS = frozenset({
    "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp", "proxy", "www-data",
    "backup", "list", "irc", "gnats", "nobody", "nogroup", "_apt", "messagebus", "sshd", "syslog", "systemd-network",
    "systemd-resolve", "systemd-timesync", "systemd-journal", "polkitd", "tss", "uuidd", "tcpdump", "landscape",
    "pollinate", "fwupd-refresh", "usbmux", "dnsmasq", "avahi", "lxd", "ubuntu", "debian", "admin", "sudo",
    "adm", "wheel", "staff", "users", "apt-cacher-ng", "gpufleet-cache",
})


@dataclass(frozen=True)
class Setting:
    name: str
    annotation: Any
    default: Any
    comment: str
    line: int

    def type_label(self) -> str:
        return _type_label(self.annotation)


def _type_label(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is typing.Union:
        return " | ".join(_type_label(a) for a in args)
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def load_settings(path: Path = ALL_SETTINGS_FILE) -> dict[str, Setting]:
    """Every setting of group_data/all.py with its annotation, default and the comment line above it."""
    source = path.read_text()
    namespace: dict[str, Any] = {}
    exec(compile(source, str(path), "exec", dont_inherit=True), namespace)
    lines = source.splitlines()
    settings: dict[str, Setting] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        name = node.target.id
        comment = lines[node.lineno - 2].strip() if node.lineno >= 2 else ""
        if not comment.startswith("#") or not comment.lstrip("#").strip():
            raise ValueError(f"{path}:{node.lineno}: setting {name} needs a one-line comment above it")
        settings[name] = Setting(
            name=name,
            annotation=namespace["__annotations__"][name],
            default=namespace[name],
            comment=comment.lstrip("#").strip(),
            line=node.lineno,
        )
    return settings


def suggest(name: str, known: typing.Iterable[str]) -> str:
    """A did-you-mean hint, or an empty string."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def check_type(annotation: Any, value: Any) -> str | None:
    """None when value fits the annotation, else what was expected."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return None if value in args else "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Union:
        if any(check_type(a, value) is None for a in args):
            return None
        return " or ".join(_type_label(a) for a in args)
    if annotation is type(None):
        return None if value is None else "null"
    if annotation is bool:
        return None if isinstance(value, bool) else "true or false"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
    if annotation is str:
        return None if isinstance(value, str) else f'a string (quote it: "{value}")'
    if annotation is list:
        return None if isinstance(value, list) else "a list"
    if annotation is dict:
        return None if isinstance(value, dict) else "a mapping"
    return None


def is_host_name(value: str) -> bool:
    """An RFC 1123 host name (ASCII labels, no trailing dot)."""
    if not isinstance(value, str) or len(value) > 253 or not value:
        return False
    return all(_LABEL.fullmatch(label) for label in value.split("."))


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return _PRINTABLE.fullmatch(value) is not None


def is_address(value: str) -> bool:
    """Where a host is reached: an RFC 1123 host name or an IP address."""
    return is_ip(value) or is_host_name(value)


def _check_version_text(value: str) -> str | None:
    expected = "a version such as 2.12.0.dev20260407+cu128, spelt exactly as pip spells it"
    if not _PRINTABLE.fullmatch(value):
        return expected
    try:
        parsed = Version(value)
    except InvalidVersion:
        return expected
    # "v0.0.35", "0.0.035" and the like parse too; pip and the fingerprint see the normal spelling only.
    return None if str(parsed) == value else f"{expected} (write {str(parsed)!r})"


def _fullmatch(pattern: re.Pattern[str], expected: str):
    def check(value: str) -> str | None:
        return None if pattern.fullmatch(value) else expected

    return check


def _check_list_of(check: typing.Callable[[Any], bool], example: str):
    def check_list(value: list) -> str | None:
        bad = [v for v in value if not isinstance(v, str) or not check(v)]
        return f"entries like {example}, not {bad[0]!r}" if bad else None

    return check_list


def _check_sha_map(value: dict) -> str | None:
    for key, sha in value.items():
        if not isinstance(key, str) or not _REPO_DIR.fullmatch(key):
            return f"repository directory names such as ubuntu2404 as keys, not {key!r}"
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            return f"64 lowercase hex digits for {key!r}"
    return None


def _between(low: int, high: int):
    def check(value: int) -> str | None:
        if low <= value <= high:
            return None
        return {0: "0 or more", 1: "a number above 0"}.get(low, f"at least {low}") + f", at most {high}"

    return check


def _url(value: str) -> str | None:
    expected = ("a URL starting with http://, https:// or file://, without spaces, quotes or any of ; $ ( ) * \\ "
                "and with a valid host name")
    if not _URL.fullmatch(value):
        return expected
    try:
        url = urlparse(value)
        port = url.port
    except ValueError:
        return expected
    if url.scheme not in ("http", "https", "file"):
        return expected
    if url.scheme != "file" and not (url.hostname and is_address(url.hostname.strip("[]"))):
        return expected
    if url.scheme == "file" and (url.netloc or not url.path.startswith("/")):
        return expected
    return None if port is None or 0 < port < 65536 else expected


def _clean_path(value: str, what: str) -> str | None:
    if not _PATH.fullmatch(value):
        return f"{what}: letters, digits and . _ + - / only (no spaces, quotes or shell characters)"
    if value != posixpath.normpath(value) or value.startswith("//") or ".." in value.split("/"):
        return f"{what} in normal form: no '..', '.', '//' or trailing '/' (e.g. {posixpath.normpath(value)!r})"
    return None


def _tool_path(value: str) -> str | None:
    """A path to something that already exists (an interpreter, a toolkit): anywhere but / itself."""
    problem = _clean_path(value, "an absolute path")
    return problem or (None if value != "/" else "a path below /, not / itself")


def _owned_path(value: str) -> str | None:
    """A directory gpufleet creates and hands to a user: never / or a system directory, never in /tmp, /proc..."""
    problem = _clean_path(value, "an absolute path")
    if problem:
        return problem
    if value in SYSTEM_DIRS:
        return f"a directory of gpufleet's own such as {value.rstrip('/')}/gpufleet, not the system directory {value}"
    tree = next((t for t in FORBIDDEN_TREES if value.startswith(t + "/")), None)
    if tree:
        return f"a path outside {tree} (gpufleet never keeps files there), e.g. /var/lib/gpufleet"
    if value == ROOT_STATE_DIR or value.startswith(ROOT_STATE_DIR + "/"):
        return f"a path outside {ROOT_STATE_DIR}, root's own directory for staged wheels and stamps"
    return None


def _local_path(value: str) -> str | None:
    return None if _LOCAL_PATH.fullmatch(value) else "a path without spaces, quotes or control characters"


def _build_user(value: str) -> str | None:
    if not _USER.fullmatch(value):
        return "a user name of lowercase letters, digits, _ and - (starting with a letter or _)"
    if value == "root":
        return "an unprivileged user name (not root)"
    if value in SYSTEM_ACCOUNTS or value.startswith("systemd-"):
        return f"an account of gpufleet's own such as gpufleet, not the existing system account '{value}'"
    return None


def _listen(value: str) -> bool:
    return is_ip(value)


# Checks beyond the type, applied when the value is not None.
VALUE_CHECKS: dict[str, typing.Callable[[Any], str | None]] = {
    "driver_branch": _fullmatch(_BRANCH, 'a driver branch such as "580"'),
    "cuda_version": _fullmatch(_CUDA_VERSION, 'major.minor such as "12.8"'),
    "python_version": _fullmatch(_PYTHON_VERSION, 'major.minor such as "3.12"'),
    "torch_version": _check_version_text,
    "xformers_version": _check_version_text,
    "xformers_source_sha256": _fullmatch(_SHA256, "64 lowercase hex digits"),
    "cuda_keyring_sha256": _check_sha_map,
    "xformers_arch_list": _check_list_of(_ARCH.fullmatch, '"12.0"'),
    "xformers_builder": lambda v: None if is_host_name(v) or v == "@local" else "a host name of this inventory",
    "xformers_patch_dir": _local_path,
    "wheel_cache_dir": _local_path,
    "report_dir": _local_path,
    "pip_trusted_hosts": _check_list_of(is_address, '"10.0.0.1" or "mirror.lab"'),
    "xformers_max_jobs": _between(1, 1024),
    "reboot_timeout": _between(30, 86400),
    "apt_lock_timeout": _between(1, 86400),
    "smoke_heads": _between(1, 256),
    # Below 10 GB no stage fits (torch with its CUDA libraries alone takes 5.4 GB).
    "min_free_disk_gb": _between(10, 100000),
    "lock_timeout": _between(0, 86400),
    "min_memory_gb": _between(0, 100000),
    "cuda_repo_url": _url,
    "torch_index_url": _url,
    "xformers_source_url": _url,
    "pip_index_url": _url,
    "venv_path": _owned_path,
    "work_dir": _owned_path,
    "cache_dir": _owned_path,
    "cuda_existing_home": _tool_path,
    "python_interpreter": _tool_path,
    "cache_apt_port": _between(1, 65535),
    "cache_pip_port": _between(1, 65535),
    "cache_listen": _check_list_of(_listen, '"10.0.0.5" (an IP address of the cache host)'),
    "build_user": _build_user,
}


def combined_problems(settings: dict[str, Any], ssh_user: str | None = None) -> list[tuple[str, str]]:
    """(setting, problem) for values that are fine alone but not together; `settings` holds every setting."""
    problems = []
    apt_port, pip_port = settings["cache_apt_port"], settings["cache_pip_port"]
    if apt_port == pip_port:
        problems.append(("cache_pip_port", f"cache_apt_port and cache_pip_port are both {apt_port}; give each "
                                           "server its own port (defaults 3142 and 3141)"))
    for name, port in (("cache_apt_port", apt_port), ("cache_pip_port", pip_port)):
        if port == 22:
            problems.append((name, "is 22, SSH's port; keep the default or pick a free port"))
    wildcard = [a for a in settings["cache_listen"] if is_ip(a) and ipaddress.ip_address(a).is_unspecified]
    if wildcard and not settings.get("cache_listen_any"):
        problems.append(("cache_listen", f"{wildcard[0]} opens the cache to every network the host is on; list "
                                         "the lab-side address, or set cache_listen_any: true to mean it"))
    if ssh_user and settings["build_user"] == ssh_user:
        problems.append(("build_user", f"'{ssh_user}' is the account gpufleet logs in as (ssh_user); gpufleet "
                                       "would change its home and shell and lock you out: use an account of its own "
                                       "such as gpufleet"))
    paths = {k: settings[k] for k in ("work_dir", "venv_path") if settings.get(k)}
    if paths.get("work_dir") and paths.get("venv_path") and (
            paths["venv_path"] == paths["work_dir"] or paths["work_dir"].startswith(paths["venv_path"] + "/")):
        problems.append(("work_dir", "must not be the venv or lie inside venv_path"))
    return problems


def validate_value(name: str, value: Any, settings: dict[str, Setting]) -> str | None:
    """None when value is acceptable for setting name, else what it should be."""
    expected = check_type(settings[name].annotation, value)
    if expected is not None:
        return expected
    check = VALUE_CHECKS.get(name)
    if check is not None and value is not None:
        problem = check(value)
        if problem is not None:
            return problem
    return _unsafe_text(value)


def _unsafe_text(value: Any) -> str | None:
    """Any text in a setting (lists and mappings included) is ASCII without whitespace or control characters."""
    if isinstance(value, str):
        return None if _PRINTABLE.fullmatch(value) and value else (
            "non-empty text of visible ASCII characters only (no spaces, tabs, newlines or control characters)")
    if isinstance(value, list):
        return next((p for p in map(_unsafe_text, value) if p), None)
    if isinstance(value, dict):
        return next((p for p in map(_unsafe_text, [*value, *value.values()]) if p), None)
    return None


def markdown_table(settings: dict[str, Setting] | None = None) -> str:
    """The README's settings table, generated from group_data/all.py."""
    settings = settings or load_settings()
    rows = ["| setting | type | default | what it does |", "| --- | --- | --- | --- |"]
    for s in settings.values():
        default = repr(s.default).replace("|", "\\|")
        rows.append(f"| `{s.name}` | {s.type_label().replace('|', 'or')} | `{default}` | {s.comment} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
