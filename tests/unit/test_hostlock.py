"""The host lock's pieces that need no host: the owner record and the holder script it runs."""

import fcntl
import re
import subprocess
from pathlib import Path

import pytest
from pyinfra.api.exceptions import PyinfraError

from gpufleet import hostlock


def test_the_owner_record_names_user_machine_pid_and_time_and_parses_back():
    owner = hostlock.owner_text()
    parsed = hostlock.parse_owner(f"{owner} holder 4242")
    assert parsed is not None and parsed["holder"] == "4242"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", parsed["since"])
    assert parsed["pid"].isdigit() and parsed["who"] and parsed["machine"]


def test_an_owner_record_in_another_shape_is_not_trusted():
    assert hostlock.parse_owner("") is None
    assert hostlock.parse_owner("root@x pid 1; rm -rf / since now holder 2") is None


def test_the_holder_script_is_valid_shell_that_waits_the_timeout_and_holds_until_end_of_file():
    script = hostlock.holder_script(hostlock.owner_text(), 7)
    assert subprocess.run(["sh", "-n", "-c", script], check=False).returncode == 0
    assert "flock -w 7 9" in script and f"read -r -t {hostlock.HOLDER_TIMEOUT_S}" in script


def test_a_control_folder_held_by_another_run_is_an_error_naming_it(tmp_path: Path):
    folder = tmp_path / "wheels"
    folder.mkdir()
    with open(folder / ".gpufleet.lock", "a+") as other:
        other.write("admin@desk pid 12 since 2026-12-02T10:00:00Z\n")
        other.flush()
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(PyinfraError, match="is in use by admin@desk pid 12 since 2026-12-02T10:00:00Z"):
            hostlock.lock_control_folder(folder, 0)
    hostlock.lock_control_folder(folder, 0)
    assert hostlock.owner_text().split(" since ")[0] in (folder / ".gpufleet.lock").read_text()
