"""The inventory's cache group: one cache host, alone or also a workstation, whose address every host is given."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gpufleet.inventory import InventoryError, load_inventory


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hosts.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def test_cache_only_host_is_in_group_cache_and_every_host_gets_its_address(tmp_path):
    inventory = load_inventory(write(tmp_path, """
        groups:
          cache:
            settings: {cache_dir: /srv/cache}
            hosts:
              cache01: {address: 10.0.0.5}
          workstations:
            hosts:
              ws01: {address: 10.0.0.11}
              ws02: {}
        """))
    assert inventory.cache_host.name == "cache01"
    assert [name for name, _ in inventory.group("cache")] == ["cache01"]
    assert [name for name, _ in inventory.group("workstations")] == ["ws01", "ws02"]
    data = dict(inventory.group("workstations") + inventory.group("cache"))
    assert {d["gpufleet_cache_address"] for d in data.values()} == {"10.0.0.5"}
    assert data["cache01"]["gpufleet_cache_server"] is True and data["cache01"]["gpufleet_group"] == "cache"
    assert "gpufleet_cache_server" not in data["ws01"]
    assert data["cache01"]["cache_dir"] == "/srv/cache"


def test_workstation_listed_under_cache_serves_it_and_keeps_its_group_and_connection(tmp_path):
    inventory = load_inventory(write(tmp_path, """
        groups:
          cache:
            settings: {cache_dir: /srv/cache, cache_apt_port: 3000}
            hosts:
              ws01: {}
          workstations:
            settings: {cache_apt_port: 4000, reboot_policy: never}
            hosts:
              ws01: {address: 10.0.0.11, settings: {cache_dir: /data/cache}}
              ws02: {}
        """))
    assert [h.name for h in inventory.hosts] == ["ws01", "ws02"]
    cache = dict(inventory.group("cache"))
    workstations = dict(inventory.group("workstations"))
    # The same host, with the same data, in both pyinfra groups.
    assert cache["ws01"] == workstations["ws01"]
    ws01 = workstations["ws01"]
    assert ws01["gpufleet_group"] == "workstations" and ws01["gpufleet_cache_server"] is True
    assert ws01["ssh_hostname"] == "10.0.0.11"
    # Host settings over the cache group's over its own group's.
    assert (ws01["cache_dir"], ws01["cache_apt_port"], ws01["reboot_policy"]) == ("/data/cache", 3000, "never")
    assert workstations["ws02"]["gpufleet_cache_address"] == "10.0.0.11"


def test_host_in_both_groups_with_connection_under_cache_is_refused_with_the_fix(tmp_path):
    with pytest.raises(InventoryError) as caught:
        load_inventory(write(tmp_path, """
            groups:
              workstations:
                hosts:
                  ws01: {address: 10.0.0.11}
              cache:
                hosts:
                  ws01: {address: 10.0.0.12}
            """))
    (problem,) = caught.value.problems
    assert "is in group 'workstations' and in 'cache'" in problem and "`ws01: {}`" in problem


def test_two_cache_hosts_are_refused(tmp_path):
    with pytest.raises(InventoryError) as caught:
        load_inventory(write(tmp_path, """
            groups:
              cache:
                hosts: {c1: {}, c2: {}}
            """))
    assert any("one cache host serves the fleet" in p for p in caught.value.problems)


def test_local_control_machine_cannot_be_the_cache_host(tmp_path):
    with pytest.raises(InventoryError) as caught:
        load_inventory(write(tmp_path, """
            groups:
              cache:
                hosts: {"@local": {}}
            """))
    assert any("@local cannot be the cache host" in p for p in caught.value.problems)


def test_host_twice_in_workstation_groups_is_still_refused(tmp_path):
    with pytest.raises(InventoryError) as caught:
        load_inventory(write(tmp_path, """
            groups:
              workstations: {hosts: {ws01: {}}}
              wsl: {hosts: {ws01: {}}}
            """))
    assert any("listed twice" in p for p in caught.value.problems)


def test_without_cache_group_hosts_get_no_cache_data(tmp_path):
    inventory = load_inventory(write(tmp_path, "groups:\n  workstations:\n    hosts:\n      ws01: {}\n"))
    assert inventory.cache_host is None
    assert inventory.group("cache") == []
    assert "gpufleet_cache_address" not in dict(inventory.group("workstations"))["ws01"]
