"""Held packages as dpkg really reports them (status `hi`), for DriverStateFact and the plan profiles."""

from __future__ import annotations

from pathlib import Path

from gpufleet.facts import parse_dpkg_versions
from tests.plan import fake_inventory

HELD = (Path(__file__).resolve().parent.parent / "data" / "captured" / "dpkg-query-held.txt").read_text()


def test_captured_dpkg_query_shows_a_held_package_as_hi():
    assert HELD.splitlines() == ["bzip2 1.0.8-5+b1 hi ", "xz-utils 5.4.1-1 ii "]


def test_a_held_package_is_still_installed():
    assert parse_dpkg_versions(HELD) == {"bzip2": "1.0.8-5+b1", "xz-utils": "5.4.1-1"}


def test_plan_profiles_render_held_packages_the_way_dpkg_does():
    profile = fake_inventory.load_profile(fake_inventory._HERE / "profiles" / "driver-branch-upgrade-held.yaml")
    answer = next(a for a in fake_inventory.fact_answers(profile) if a.fact == "DriverStateFact")
    dpkg = answer.stdout.split("== dpkg\n", 1)[1].split("\n== ", 1)[0].splitlines()
    assert "nvidia-open-580 580.95.05-0ubuntu1 hi " in dpkg
    assert "cuda-keyring 1.1-1 ii " in dpkg
