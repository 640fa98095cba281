"""Load and validate the YAML inventory before pyinfra connects anywhere.

Every problem in the file is reported at once, each with the file, line, key and fix; nothing is contacted
while any remains.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpufleet.settings import (
    REPO_ROOT,
    Setting,
    combined_problems,
    is_address,
    is_host_name,
    load_settings,
    suggest,
    validate_value,
)

DEFAULT_INVENTORY = REPO_ROOT / "inventory" / "hosts.yaml"
INVENTORY_ENV = "GPUFLEET_INVENTORY"

GROUPS = ("workstations", "wsl", "cache")
# The group whose host serves the fleet download cache (deploys/cache.py); it may also be a workstation.
CACHE_GROUP = "cache"
TOP_KEYS = ("settings", "groups")
GROUP_KEYS = ("settings", "hosts")
HOST_KEYS = ("address", "ssh_user", "ssh_port", "ssh_key", "ssh_known_hosts_file", "sudo", "settings")
# Limits that keep a hostile file from exhausting the checker: size, nesting, nodes after aliases expand.
MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 32
MAX_NODES = 100_000
# The only YAML types an inventory holds; any other tag (!!python/object, !env, !!binary) is refused.
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in (
    "str", "int", "float", "bool", "null", "map", "seq", "merge", "timestamp")}
_SSH_USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
# Control-machine files for ssh: no whitespace, control characters or leading '-' (never read as an option).
_LOCAL_FILE = re.compile(r"[A-Za-z0-9._+/~][A-Za-z0-9._+/~@=,-]*")


@dataclass
class HostSpec:
    name: str
    group: str
    line: int
    connection: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    # Serves the fleet cache (listed under `cache`, alone or besides its workstations/wsl entry).
    cache_server: bool = False
    # The cache host's address every host reaches apt and pip through; None = no cache in this inventory.
    cache_address: str | None = None

    @property
    def address(self) -> str:
        return str(self.connection.get("address", self.name))

    def pyinfra_data(self) -> dict[str, Any]:
        """Host data for pyinfra: merged settings plus connection keys, host-key checking always strict."""
        data: dict[str, Any] = dict(self.settings)
        data["gpufleet_group"] = self.group
        if self.cache_address:
            data["gpufleet_cache_address"] = self.cache_address
        if self.cache_server:
            data["gpufleet_cache_server"] = True
        conn = self.connection
        if conn.get("sudo"):
            data["_sudo"] = True
        if self.name == "@local":
            return data
        data["ssh_hostname"] = conn.get("address", self.name)
        data["ssh_strict_host_key_checking"] = "yes"
        for key in ("ssh_user", "ssh_port", "ssh_known_hosts_file"):
            if key in conn:
                data[key] = conn[key]
        if "ssh_key" in conn:
            data["ssh_key"] = os.path.expanduser(conn["ssh_key"])
        return data


@dataclass
class Inventory:
    path: Path
    hosts: list[HostSpec]

    def group(self, name: str) -> list[tuple[str, dict[str, Any]]]:
        """pyinfra's (name, data) list; a cache host that is also a workstation is in both, with the same data."""
        if name == CACHE_GROUP:
            return [(h.name, h.pyinfra_data()) for h in self.hosts if h.cache_server]
        return [(h.name, h.pyinfra_data()) for h in self.hosts if h.group == name]

    @property
    def cache_host(self) -> HostSpec | None:
        return next((h for h in self.hosts if h.cache_server), None)


class InventoryError(Exception):
    def __init__(self, path: Path, problems: list[str]):
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s), nothing was contacted:\n{lines}")


class _Checker:
    def __init__(self, path: Path, settings: dict[str, Setting]):
        self.path = path
        self.settings = settings
        self.problems: list[str] = []
        # Where each xformers_builder value is set, checked once the hosts are known.
        self.builder_values: list[tuple[yaml.Node, str, str]] = []

    def problem(self, node: yaml.Node, where: str, text: str) -> None:
        self.problems.append(f"{self.path}:{node.start_mark.line + 1}: {where}: {text}")

    def mapping(self, node: yaml.Node | None, where: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """The (key, key node, value node) pairs of a mapping; duplicates and non-string keys are problems."""
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            return []
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, where, "expected a mapping (key: value lines)")
            return []
        seen: dict[str, int] = {}
        pairs = []
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str) or key == "":
                self.problem(key_node, where, "keys must be plain names")
                continue
            if key in seen:
                self.problem(key_node, where, f"'{key}' appears twice (first on line {seen[key]}); keep one")
                continue
            seen[key] = key_node.start_mark.line + 1
            pairs.append((key, key_node, value_node))
        return pairs

    def unknown(self, key_node: yaml.Node, where: str, key: str, known: tuple[str, ...] | list[str]) -> None:
        self.problem(
            key_node, where, f"unknown key '{key}'.{suggest(key, known)} Known keys: {', '.join(known)}"
        )

    def settings_block(self, node: yaml.Node, where: str) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for key, key_node, value_node in self.mapping(node, f"{where} settings"):
            if key not in self.settings:
                self.problem(
                    key_node,
                    f"{where} settings",
                    f"unknown setting '{key}'.{suggest(key, self.settings)} "
                    "Settings are listed in group_data/all.py and the README",
                )
                continue
            value = _construct(value_node)
            expected = validate_value(key, value, self.settings)
            if expected is not None:
                self.problem(
                    value_node, f"{where} setting '{key}'", f"got {value!r}; expected {expected}"
                )
                continue
            values[key] = value
            if key == "xformers_builder" and value is not None:
                self.builder_values.append((value_node, where, value))
        return values

    def host(self, name: str, name_node: yaml.Node, node: yaml.Node, group: str) -> HostSpec:
        where = f"host '{name}'"
        if name != "@local" and not is_host_name(name):
            self.problem(name_node, where, "not a valid host name (RFC 1123: letters, digits, '-' and '.'); "
                                           "use a DNS name or set address: to the IP")
        spec = HostSpec(name=name, group=group, line=name_node.start_mark.line + 1)
        for key, key_node, value_node in self.mapping(node, where):
            if key not in HOST_KEYS:
                hint = suggest(key, list(HOST_KEYS) + list(self.settings))
                if key in self.settings:
                    hint = f" Settings go under the host's settings: block ({key} is a setting)."
                self.problem(key_node, where, f"unknown key '{key}'.{hint} Known keys: {', '.join(HOST_KEYS)}")
                continue
            if key == "settings":
                spec.settings = self.settings_block(value_node, where)
                continue
            value = _construct(value_node)
            expected = _connection_problem(key, value)
            if expected:
                self.problem(value_node, f"{where} {key}", f"got {value!r}; expected {expected}")
            elif name == "@local" and key != "sudo":
                self.problem(key_node, where, f"'{key}' does not apply to @local (this machine, no SSH); remove it")
            else:
                spec.connection[key] = value
        return spec


def _construct(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _connection_problem(key: str, value: Any) -> str | None:
    if key == "ssh_port":
        ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536
        return None if ok else "a port number from 1 to 65535"
    if key == "sudo":
        return None if isinstance(value, bool) else "true or false"
    if not isinstance(value, str) or not value:
        return "a non-empty string"
    if key == "address":
        return None if is_address(value) else "a host name (RFC 1123: letters, digits, '-' and '.') or an IP address"
    if key == "ssh_user":
        return None if _SSH_USER.fullmatch(value) else "a user name of lowercase letters, digits, '.', '_' and '-'"
    return None if _LOCAL_FILE.fullmatch(value) else "a file path without spaces, quotes or a leading '-'"


def _compose(path: Path) -> yaml.Node | None:
    """The file's YAML node tree, or InventoryError with one clear line: never a traceback, whatever the file."""
    def refuse(text: str) -> InventoryError:
        return InventoryError(path, [f"{path}: {text}"])

    if path.is_dir():
        raise refuse("is a directory; pass the inventory YAML file itself (e.g. inventory/hosts.yaml)")
    if not path.is_file():
        raise refuse(f"no such file; set {INVENTORY_ENV} or create inventory/hosts.yaml")
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise refuse(f"cannot be read ({error.strerror}); check its permissions") from None
    if len(data) > MAX_FILE_BYTES:
        raise refuse(f"is larger than {MAX_FILE_BYTES // 1024} KiB; an inventory is a short list of hosts")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise InventoryError(path, [f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); "
                                    "save the file as UTF-8"]) from None
    try:
        _check_events(path, text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "context_mark", None) or getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or error
        raise InventoryError(path, [f"{path}{line}: not valid YAML: {problem}"]) from None
    except RecursionError:
        raise refuse(f"is nested too deeply; an inventory needs at most {MAX_DEPTH} levels") from None
    if root is not None:
        _check_nodes(path, root)
    return root


def _check_events(path: Path, text: str) -> None:
    """Nesting depth and tags, read from the event stream before a tree is built (building it recurses)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1
                raise InventoryError(path, [f"{path}:{line}: nested more than {MAX_DEPTH} levels deep; "
                                            "an inventory is settings, groups and hosts"])
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        tag = getattr(event, "tag", None)
        if tag and tag not in ("!", "?") and tag not in _PLAIN_TAGS:
            line = event.start_mark.line + 1
            raise InventoryError(path, [f"{path}:{line}: YAML tag {tag} is not allowed; an inventory holds plain "
                                        "text, numbers, true/false, lists and mappings: remove the tag"])


def _check_nodes(path: Path, root: yaml.Node) -> None:
    """Aliases may repeat a node many times over: the tree as read, aliases expanded, stays small."""
    count = 0
    stack = [root]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise InventoryError(path, [f"{path}: expands to more than {MAX_NODES} values through YAML aliases "
                                        "(&anchor/*alias); write the values out or use fewer aliases"])
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack += [key, value]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value
        elif node.tag not in _PLAIN_TAGS:
            line = node.start_mark.line + 1
            raise InventoryError(path, [f"{path}:{line}: YAML tag {node.tag} is not allowed; remove the tag"])


def load_inventory(path: Path | str | None = None) -> Inventory:
    """Parse and validate the inventory; raise InventoryError listing every problem."""
    path = Path(path or os.environ.get(INVENTORY_ENV) or DEFAULT_INVENTORY)
    root = _compose(path)
    checker = _Checker(path, load_settings())
    if root is None:
        raise InventoryError(path, [f"{path}: the file is empty; see inventory/hosts.yaml for the format"])
    fleet_settings, groups_node = _top_level(checker, root)
    listing = _Listing(checker, fleet_settings)
    for group, group_key, group_node in checker.mapping(groups_node, "groups"):
        listing.add_group(group, group_key, group_node)
    hosts = listing.hosts
    _merge_cache_entries(checker, listing)
    _check_one_cache_host(checker, hosts)
    _point_hosts_at_the_cache(hosts)
    _check_host_settings(checker, hosts)
    _warn_of_a_cache_open_to_every_network(checker, hosts)
    _check_builders(checker, hosts)
    if not hosts and not checker.problems:
        checker.problems.append(f"{path}: no hosts; add some under groups: workstations: hosts:")
    if checker.problems:
        raise InventoryError(path, checker.problems)
    return Inventory(path=path, hosts=hosts)


def _top_level(checker: _Checker, root: yaml.Node) -> tuple[dict[str, Any], yaml.Node | None]:
    """The fleet's settings and the groups node."""
    fleet_settings: dict[str, Any] = {}
    groups_node = None
    for key, key_node, value_node in checker.mapping(root, "top level"):
        if key == "settings":
            fleet_settings = checker.settings_block(value_node, "fleet")
        elif key == "groups":
            groups_node = value_node
        else:
            checker.unknown(key_node, "top level", key, TOP_KEYS)
    return fleet_settings, groups_node


class _Listing:
    """The hosts as the groups list them, in file order, each with its settings over its group's and the fleet's.

    A host under `cache` and under workstations or wsl is one host: its workstation entry.
    """

    def __init__(self, checker: _Checker, fleet_settings: dict[str, Any]):
        self.checker = checker
        self.fleet_settings = fleet_settings
        self.hosts: list[HostSpec] = []
        self.first_seen: dict[str, HostSpec] = {}
        # Per host listed under cache: its name node, whether its entry there is empty, the cache group's settings.
        self.cache_entries: dict[str, tuple[yaml.Node, bool, dict[str, Any]]] = {}
        # Per host: the settings its own entry gives.
        self.own_settings: dict[str, dict[str, Any]] = {}

    def add_group(self, group: str, group_key: yaml.Node, group_node: yaml.Node) -> None:
        checker = self.checker
        if group not in GROUPS:
            checker.problem(
                group_key,
                "groups",
                f"unknown group '{group}'.{suggest(group, GROUPS)} Groups are: {', '.join(GROUPS)}",
            )
            return
        group_settings: dict[str, Any] = {}
        hosts_node = None
        for key, key_node, value_node in checker.mapping(group_node, f"group '{group}'"):
            if key == "settings":
                group_settings = checker.settings_block(value_node, f"group '{group}'")
            elif key == "hosts":
                hosts_node = value_node
            else:
                checker.unknown(key_node, f"group '{group}'", key, GROUP_KEYS)
        for name, name_node, host_node in checker.mapping(hosts_node, f"group '{group}' hosts"):
            self.add_host(checker.host(name, name_node, host_node, group), name_node, group_settings)

    def add_host(self, spec: HostSpec, name_node: yaml.Node, group_settings: dict[str, Any]) -> None:
        name, group = spec.name, spec.group
        if group == CACHE_GROUP:
            self.cache_entries[name] = (name_node, not spec.connection and not spec.settings, group_settings)
        first = self.first_seen.get(name)
        if first is None:
            self._keep(spec, group_settings)
            self.hosts.append(spec)
            return
        if CACHE_GROUP in (group, first.group) and group != first.group:
            # A workstation that also serves the cache: its workstation entry is the host (_merge_cache_entries).
            if first.group == CACHE_GROUP:
                self.hosts[self.hosts.index(first)] = spec
                self._keep(spec, group_settings)
            return
        self.checker.problem(
            name_node,
            f"host '{name}'",
            f"listed twice (first in group '{first.group}' on line {first.line}); "
            "a host belongs to one group (besides 'cache')",
        )

    def _keep(self, spec: HostSpec, group_settings: dict[str, Any]) -> None:
        self.first_seen[spec.name] = spec
        self.own_settings[spec.name] = spec.settings
        spec.settings = {**self.fleet_settings, **group_settings, **spec.settings}


def _merge_cache_entries(checker: _Checker, listing: _Listing) -> None:
    """A host under `cache` serves the cache; one also under workstations or wsl is listed under cache as `{}`, and
    the cache group's settings (cache_dir, ...) apply to it under its own host settings."""
    by_name = {h.name: h for h in listing.hosts}
    for name, (name_node, empty, cache_settings) in listing.cache_entries.items():
        spec = by_name.get(name)
        if spec is None:
            continue
        spec.cache_server = True
        if spec.group == CACHE_GROUP:
            continue
        if not empty:
            checker.problem(
                name_node,
                f"host '{name}'",
                f"is in group '{spec.group}' and in 'cache': give its address, connection and settings under "
                f"'{spec.group}' only and list it under cache as `{name}: {{}}`",
            )
        spec.settings = {**spec.settings, **cache_settings, **listing.own_settings[name]}


def _check_one_cache_host(checker: _Checker, hosts: list[HostSpec]) -> None:
    """At most one cache host, reached by its network address."""
    servers = [h for h in hosts if h.cache_server]
    if len(servers) > 1:
        checker.problems.append(
            f"{checker.path}: group 'cache' lists {len(servers)} hosts ({', '.join(h.name for h in servers)}); "
            "one cache host serves the fleet: keep one"
        )
    for spec in servers:
        if spec.name == "@local":
            checker.problems.append(
                f"{checker.path}: @local cannot be the cache host: the other hosts need its network address; "
                "list it by name with address:"
            )


def _point_hosts_at_the_cache(hosts: list[HostSpec]) -> None:
    servers = [h for h in hosts if h.cache_server]
    if len(servers) == 1:
        for spec in hosts:
            spec.cache_address = servers[0].address


def _effective_settings(checker: _Checker, spec: HostSpec) -> dict[str, Any]:
    """The host's settings over group_data/all.py's defaults."""
    return {**{name: s.default for name, s in checker.settings.items()}, **spec.settings}


def _check_host_settings(checker: _Checker, hosts: list[HostSpec]) -> None:
    """Rules between settings (settings.combined_problems); the cache's settings matter on the cache host only."""
    for spec in hosts:
        for key, text in combined_problems(_effective_settings(checker, spec), spec.connection.get("ssh_user")):
            if key.startswith("cache_") and not spec.cache_server:
                continue
            checker.problems.append(f"{checker.path}:{spec.line}: host '{spec.name}' setting '{key}': {text}")


def _warn_of_a_cache_open_to_every_network(checker: _Checker, hosts: list[HostSpec]) -> None:
    for spec in hosts:
        merged = _effective_settings(checker, spec)
        if spec.cache_server and any(a in ("0.0.0.0", "::") for a in merged["cache_listen"]) \
                and merged["cache_listen_any"]:
            print(f"gpufleet: warning: {spec.name}'s cache listens on every network (cache_listen_any); "
                  "apt-cacher-ng and devpi-server have no access control", file=sys.stderr)


def _check_builders(checker: _Checker, hosts: list[HostSpec]) -> None:
    """Every xformers_builder names a host of this inventory."""
    names = {h.name for h in hosts}
    for node, where, builder in checker.builder_values:
        if builder not in names:
            checker.problem(
                node, f"{where} setting 'xformers_builder'",
                f"'{builder}' is not a host of this inventory.{suggest(builder, names)}"
            )


def load_inventory_or_exit(path: Path | str | None = None) -> Inventory:
    """For inventory.py: print the problems and exit 2, so pyinfra contacts no host."""
    try:
        return load_inventory(path)
    except InventoryError as error:
        print(f"gpufleet: invalid inventory {error}", file=sys.stderr)
        raise SystemExit(2) from None
