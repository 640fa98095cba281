"""The settings schema: read from group_data/all.py (names, types, defaults, comments) so it lives in one place."""

from __future__ import annotations

import ast
import difflib
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

REPO_ROOT = Path(__file__).resolve().parent.parent
ALL_SETTINGS_FILE = REPO_ROOT / "group_data" / "all.py"

_MAJOR_MINOR = re.compile(r"^\d+\.\d+$")
_BRANCH = re.compile(r"^\d{3}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ARCH = re.compile(r"^\d{1,2}\.\d$")


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
        if not comment.startswith("#"):
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


def _check_version_text(value: str) -> str | None:
    try:
        Version(value)
    except InvalidVersion:
        return "a version such as 2.12.0.dev20260407+cu128"
    return None


def _check_list_of(pattern: re.Pattern[str], example: str):
    def check(value: list) -> str | None:
        bad = [v for v in value if not isinstance(v, str) or not pattern.match(v)]
        return f"entries like {example}, not {bad[0]!r}" if bad else None

    return check


def _check_sha_map(value: dict) -> str | None:
    for key, sha in value.items():
        if not isinstance(sha, str) or not _SHA256.match(sha):
            return f"64 lowercase hex digits for {key!r}"
    return None


def _positive(value: int) -> str | None:
    return None if value > 0 else "a number above 0"


def _url(value: str) -> str | None:
    return None if re.match(r"^(https?|file)://", value) else "a URL starting with http://, https:// or file://"


def _absolute_path(value: str) -> str | None:
    return None if value.startswith("/") else "an absolute path"


# Checks beyond the type, applied when the value is not None.
VALUE_CHECKS: dict[str, typing.Callable[[Any], str | None]] = {
    "driver_branch": lambda v: None if _BRANCH.match(v) else 'a driver branch such as "580"',
    "cuda_version": lambda v: None if _MAJOR_MINOR.match(v) else 'major.minor such as "12.8"',
    "python_version": lambda v: None if _MAJOR_MINOR.match(v) else 'major.minor such as "3.12"',
    "torch_version": _check_version_text,
    "xformers_version": _check_version_text,
    "xformers_source_sha256": lambda v: None if _SHA256.match(v) else "64 lowercase hex digits",
    "cuda_keyring_sha256": _check_sha_map,
    "xformers_arch_list": _check_list_of(_ARCH, '"12.0"'),
    "pip_trusted_hosts": _check_list_of(re.compile(r"^[\w.\-:\[\]]+$"), '"10.0.0.1"'),
    "xformers_max_jobs": _positive,
    "reboot_timeout": _positive,
    "apt_lock_timeout": _positive,
    "smoke_heads": _positive,
    # Below 10 GB no stage fits (torch with its CUDA libraries alone takes 5.4 GB).
    "min_free_disk_gb": lambda v: None if v >= 10 else "10 or more",
    "lock_timeout": lambda v: None if 0 <= v <= 86400 else "0 (fail at once) to 86400 seconds",
    "min_memory_gb": lambda v: None if v >= 0 else "0 or more",
    "cuda_repo_url": _url,
    "torch_index_url": _url,
    "xformers_source_url": _url,
    "pip_index_url": _url,
    "venv_path": _absolute_path,
    "work_dir": _absolute_path,
    "cuda_existing_home": _absolute_path,
    "python_interpreter": _absolute_path,
    "cache_dir": _absolute_path,
    "cache_apt_port": lambda v: None if 0 < v < 65536 else "a port number from 1 to 65535",
    "cache_pip_port": lambda v: None if 0 < v < 65536 else "a port number from 1 to 65535",
    "cache_listen": _check_list_of(re.compile(r"^[\w.\-:\[\]]+$"), '"10.0.0.5"'),
    "build_user": lambda v: None if re.match(r"^[a-z_][a-z0-9_-]{0,31}$", v) and v != "root" else "an unprivileged user name (not root)",
}


def validate_value(name: str, value: Any, settings: dict[str, Setting]) -> str | None:
    """None when value is acceptable for setting name, else what it should be."""
    expected = check_type(settings[name].annotation, value)
    if expected is not None:
        return expected
    check = VALUE_CHECKS.get(name)
    if check is not None and value is not None:
        return check(value)
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
