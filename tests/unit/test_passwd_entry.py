"""PasswdEntry, the one lookup that decides whether the python stage plans pyinfra's server.user, run for real."""

import subprocess

import pytest
from pyinfra.api.exceptions import FactProcessError

from gpufleet.facts import PasswdEntry


def read(user: str):
    out = subprocess.run(["sh", "-c", PasswdEntry().command(user=user)], capture_output=True, text=True, check=True)
    return PasswdEntry().process(out.stdout.splitlines())


def test_an_existing_user_gives_home_and_shell() -> None:
    entry = read("root")
    assert entry is not None and entry["home"] == "/root" and entry["shell"].startswith("/")


def test_a_missing_user_is_none() -> None:
    assert read("gpufleet-no-such-user") is None


def test_a_hostile_user_name_stays_one_argument() -> None:
    assert read("root; echo root:x:0:0::/:/bin/sh") is None


def test_a_garbled_entry_fails_that_host() -> None:
    with pytest.raises(FactProcessError):
        PasswdEntry().process(["not a passwd line"])
