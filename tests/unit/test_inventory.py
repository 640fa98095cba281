"""The YAML inventory: every mistake is named with file, line, key and fix before anything is contacted."""

from __future__ import annotations

import os
import socket
import textwrap
import threading
from pathlib import Path

import pytest

from gpufleet.inventory import (
    DEFAULT_INVENTORY,
    INVENTORY_ENV,
    InventoryError,
    load_inventory,
)
from gpufleet.settings import load_settings, validate_value
from tests.conftest import run_pyinfra

ONE_HOST = "groups:\n  workstations:\n    hosts:\n      ws01: {}\n"


def write(tmp_path: Path, text: str, name: str = "hosts.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    return caught.value.problems


# (id, file text, line the problem is on, key named, fragments of the fix)
MALFORMED = [
    (
        "unknown_top_level_key_suggests_settings",
        "setings: {}\n" + ONE_HOST,
        1, "'setings'", ["Did you mean 'settings'?", "Known keys: settings, groups"],
    ),
    (
        "unknown_group_key_suggests_settings",
        """
        groups:
          workstations:
            setting: {reboot_policy: never}
            hosts: {ws01: {}}
        """,
        3, "'setting'", ["Did you mean 'settings'?", "Known keys: settings, hosts"],
    ),
    (
        "unknown_host_key_suggests_address",
        """
        groups:
          workstations:
            hosts:
              ws01:
                adress: 192.0.2.11
        """,
        5, "'adress'", ["Did you mean 'address'?", "Known keys: address"],
    ),
    (
        "unknown_fleet_setting_suggests_the_close_one",
        'settings:\n  torch_versio: "2.12.0"\n' + ONE_HOST,
        2, "'torch_versio'", ["Did you mean 'torch_version'?", "group_data/all.py"],
    ),
    (
        "unknown_group_setting_suggests_the_close_one",
        """
        groups:
          workstations:
            settings:
              driver_brnach: "580"
            hosts: {ws01: {}}
        """,
        4, "'driver_brnach'", ["Did you mean 'driver_branch'?"],
    ),
    (
        "setting_at_host_level_is_sent_to_the_settings_block",
        """
        groups:
          workstations:
            hosts:
              ws01:
                reboot_policy: never
        """,
        5, "'reboot_policy'", ["Settings go under the host's settings: block"],
    ),
    (
        "unquoted_driver_branch_says_quote_it",
        "settings:\n  driver_branch: 580\n" + ONE_HOST,
        2, "'driver_branch'", ["got 580", "a string", 'quote it: "580"'],
    ),
    (
        "float_cuda_version_asks_for_a_string",
        "settings:\n  cuda_version: 12.8\n" + ONE_HOST,
        2, "'cuda_version'", ["got 12.8", "expected a string"],
    ),
    (
        "float_python_version_asks_for_a_string",
        "settings:\n  python_version: 3.12\n" + ONE_HOST,
        2, "'python_version'", ["got 3.12", "expected a string"],
    ),
    (
        "reboot_policy_sometimes_lists_the_choices",
        "settings:\n  reboot_policy: sometimes\n" + ONE_HOST,
        2, "'reboot_policy'", ["got 'sometimes'", "one of 'auto', 'never'"],
    ),
    (
        "driver_flavour_closed_lists_the_choices",
        "settings:\n  driver_flavour: closed\n" + ONE_HOST,
        2, "'driver_flavour'", ["one of 'open', 'proprietary'"],
    ),
    (
        "driver_source_debian_lists_the_choices",
        "settings:\n  driver_source: debian\n" + ONE_HOST,
        2, "'driver_source'", ["one of 'nvidia', 'ubuntu'"],
    ),
    (
        "two_digit_driver_branch_shows_a_real_branch",
        "settings:\n  driver_branch: \"58\"\n" + ONE_HOST,
        2, "'driver_branch'", ['a driver branch such as "580"'],
    ),
    (
        "ssh_port_with_letters_asks_for_a_port_number",
        """
        groups:
          workstations:
            hosts:
              ws01:
                ssh_port: "22x"
        """,
        5, "ssh_port", ["got '22x'", "a port number from 1 to 65535"],
    ),
    (
        "ssh_port_zero_is_out_of_range",
        "groups:\n  workstations:\n    hosts:\n      ws01:\n        ssh_port: 0\n",
        5, "ssh_port", ["a port number from 1 to 65535"],
    ),
    (
        "ssh_port_true_is_not_a_port",
        "groups:\n  workstations:\n    hosts:\n      ws01:\n        ssh_port: true\n",
        5, "ssh_port", ["got True", "a port number from 1 to 65535"],
    ),
    (
        "quoted_sudo_yes_asks_for_a_boolean",
        """
        groups:
          workstations:
            hosts:
              ws01:
                sudo: "yes"
        """,
        5, "sudo", ["got 'yes'", "true or false"],
    ),
    (
        "empty_ssh_user_asks_for_a_name",
        "groups:\n  workstations:\n    hosts:\n      ws01:\n        ssh_user: ''\n",
        5, "ssh_user", ["a non-empty string"],
    ),
    (
        "torch_version_that_is_no_version_shows_the_pinned_form",
        'settings:\n  torch_version: "latest nightly"\n' + ONE_HOST,
        2, "'torch_version'", ["a version such as 2.12.0.dev20260407+cu128"],
    ),
    (
        "xformers_version_that_is_no_version_is_refused",
        'settings:\n  xformers_version: "v0.0.35-sm120"\n' + ONE_HOST,
        2, "'xformers_version'", ["a version such as"],
    ),
    (
        "short_xformers_sha256_asks_for_64_hex_digits",
        'settings:\n  xformers_source_sha256: "f7fc183a58e4"\n' + ONE_HOST,
        2, "'xformers_source_sha256'", ["64 lowercase hex digits"],
    ),
    (
        "uppercase_keyring_sha256_names_the_repository",
        "settings:\n  cuda_keyring_sha256:\n    ubuntu2404: D2A6B11C\n" + ONE_HOST,
        3, "'cuda_keyring_sha256'", ["64 lowercase hex digits for 'ubuntu2404'"],
    ),
    (
        "arch_list_with_sm_names_shows_the_form",
        'settings:\n  xformers_arch_list: ["sm_120"]\n' + ONE_HOST,
        2, "'xformers_arch_list'", ['entries like "12.0"', "'sm_120'"],
    ),
    (
        "arch_list_with_unquoted_numbers_shows_the_quoted_form",
        "settings:\n  xformers_arch_list: [12.0]\n" + ONE_HOST,
        2, "'xformers_arch_list'", ['entries like "12.0"'],
    ),
    (
        "arch_list_given_as_one_string_asks_for_a_list",
        'settings:\n  xformers_arch_list: "12.0"\n' + ONE_HOST,
        2, "'xformers_arch_list'", ["list or null"],
    ),
    (
        "pip_trusted_hosts_given_as_one_string_asks_for_a_list",
        "settings:\n  pip_trusted_hosts: 10.0.0.1\n" + ONE_HOST,
        2, "'pip_trusted_hosts'", ["a list"],
    ),
    (
        "zero_max_jobs_asks_for_a_positive_number",
        "settings:\n  xformers_max_jobs: 0\n" + ONE_HOST,
        2, "'xformers_max_jobs'", ["a number above 0"],
    ),
    (
        "negative_free_disk_is_refused",
        "settings:\n  min_free_disk_gb: -1\n" + ONE_HOST,
        2, "'min_free_disk_gb'", ["at least 10"],
    ),
    (
        "free_disk_minimum_of_zero_is_refused",
        "settings:\n  min_free_disk_gb: 0\n" + ONE_HOST,
        2, "'min_free_disk_gb'", ["at least 10"],
    ),
    (
        "negative_lock_timeout_is_refused",
        "settings:\n  lock_timeout: -5\n" + ONE_HOST,
        2, "'lock_timeout'", ["0 or more, at most 86400"],
    ),
    (
        "index_url_without_scheme_asks_for_a_url",
        "settings:\n  torch_index_url: download.pytorch.org/whl/nightly/cu128\n" + ONE_HOST,
        2, "'torch_index_url'", ["a URL starting with http://, https:// or file://"],
    ),
    (
        "build_user_root_asks_for_an_unprivileged_user",
        "settings:\n  build_user: root\n" + ONE_HOST,
        2, "'build_user'", ["got 'root'", "not root"],
    ),
    (
        "relative_venv_path_asks_for_an_absolute_one",
        "settings:\n  venv_path: opt/gpufleet/venv\n" + ONE_HOST,
        2, "'venv_path'", ["an absolute path"],
    ),
    (
        "relative_python_interpreter_asks_for_an_absolute_one",
        "settings:\n  python_interpreter: python3.12\n" + ONE_HOST,
        2, "'python_interpreter'", ["an absolute path"],
    ),
    (
        "null_driver_branch_asks_for_a_string",
        "settings:\n  driver_branch: null\n" + ONE_HOST,
        2, "'driver_branch'", ["got None", "a string"],
    ),
    (
        "duplicate_key_in_one_host_names_the_first_line",
        """
        groups:
          workstations:
            hosts:
              ws01:
                address: 192.0.2.11
                address: 192.0.2.12
        """,
        6, "'address'", ["appears twice (first on line 5)", "keep one"],
    ),
    (
        "duplicate_top_level_settings_names_the_first_line",
        "settings: {}\nsettings: {reboot_policy: never}\n" + ONE_HOST,
        2, "'settings'", ["appears twice (first on line 1)"],
    ),
    (
        "unknown_group_suggests_the_close_one",
        """
        groups:
          workstation:
            hosts: {ws01: {}}
        """,
        2, "'workstation'", ["Did you mean 'workstations'?", "Groups are: workstations, wsl"],
    ),
    (
        "host_listed_in_two_groups_names_the_first",
        """
        groups:
          workstations:
            hosts:
              ws01: {}
          wsl:
            hosts:
              ws01: {}
        """,
        7, "'ws01'", ["listed twice (first in group 'workstations' on line 4)", "a host belongs to one group"],
    ),
    (
        "ssh_key_on_local_says_remove_it",
        """
        groups:
          workstations:
            hosts:
              "@local":
                ssh_key: ~/.ssh/id_ed25519
        """,
        5, "'ssh_key'", ["does not apply to @local", "remove it"],
    ),
    (
        "host_name_with_a_space_says_use_address",
        "groups:\n  workstations:\n    hosts:\n      'ws 01': {}\n",
        4, "'ws 01'", ["not a valid host name", "set address: to the IP"],
    ),
    (
        "settings_given_as_a_list_asks_for_a_mapping",
        "settings:\n  - reboot_policy: never\n" + ONE_HOST,
        2, "settings", ["expected a mapping"],
    ),
    (
        "hosts_given_as_a_list_asks_for_a_mapping",
        "groups:\n  workstations:\n    hosts:\n      - ws01\n",
        4, "hosts", ["expected a mapping"],
    ),
]


@pytest.mark.parametrize(
    "text, line, key, fix", [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED]
)
def test_malformed_inventory_names_file_line_key_and_fix(tmp_path, text, line, key, fix):
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    problem = problems[0]
    assert problem.startswith(f"{path}:{line}: "), problem
    assert key in problem
    for fragment in fix:
        assert fragment in problem



def test_float_cuda_version_shows_its_own_quoted_value(tmp_path):
    path = write(tmp_path, "settings:\n  cuda_version: 12.8\n" + ONE_HOST)
    (problem,) = problems_of(path)
    assert '"12.8"' in problem
    assert '"580"' not in problem


def test_missing_builder_names_the_setting_and_the_close_host(tmp_path):
    path = write(
        tmp_path,
        """
        settings:
          xformers_builder: ws10
        groups:
          workstations:
            hosts:
              ws01: {}
        """,
    )
    problems = problems_of(path)
    assert problems
    assert all(str(path) in p and "'xformers_builder'" in p and "'ws10' is not a host" in p for p in problems)
    assert "Did you mean 'ws01'?" in problems[0]



def test_missing_builder_is_reported_once_at_its_line(tmp_path):
    path = write(
        tmp_path,
        """
        settings:
          xformers_builder: ws99
        groups:
          workstations:
            hosts:
              ws01: {}
              ws02: {}
        """,
    )
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:2: ")



def test_sudo_on_local_is_passed_to_pyinfra(tmp_path):
    # The shipped inventory's only host is @local; a user who is not root needs sudo there.
    path = write(tmp_path, 'groups:\n  workstations:\n    hosts:\n      "@local":\n        sudo: true\n')
    (host,) = load_inventory(path).hosts
    assert host.pyinfra_data()["_sudo"] is True


def test_builder_naming_a_host_of_the_inventory_is_accepted(tmp_path):
    path = write(tmp_path, "settings:\n  xformers_builder: ws01\n" + ONE_HOST)
    (host,) = load_inventory(path).hosts
    assert host.settings["xformers_builder"] == "ws01"


def test_empty_file_says_it_is_empty_and_where_the_format_is(tmp_path):
    path = write(tmp_path, "")
    (problem,) = problems_of(path)
    assert problem.startswith(str(path))
    assert "the file is empty" in problem and "inventory/hosts.yaml" in problem


def test_file_of_only_comments_counts_as_empty(tmp_path):
    path = write(tmp_path, "# hosts go here\n")
    (problem,) = problems_of(path)
    assert "the file is empty" in problem


def test_invalid_yaml_names_the_line_and_the_parser_problem(tmp_path):
    path = write(tmp_path, "groups:\n  workstations:\n    hosts:\n      ws01: {address: [192.0.2.11}\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:4: not valid YAML: expected ',' or ']'")



def test_unterminated_quote_names_the_line_it_starts_on(tmp_path):
    path = write(tmp_path, 'groups:\n  workstations:\n    hosts:\n      ws01: {address: "192.0.2.11}\n')
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:4: not valid YAML")


def test_tab_indentation_names_the_line(tmp_path):
    path = write(tmp_path, "groups:\n\tworkstations: {}\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:2: not valid YAML")
    assert "'\\t'" in problem


def test_inventory_without_hosts_says_where_to_add_them(tmp_path):
    path = write(tmp_path, "groups:\n  workstations:\n    hosts: {}\n")
    (problem,) = problems_of(path)
    assert problem.startswith(str(path))
    assert "no hosts" in problem and "groups: workstations: hosts:" in problem


def test_missing_file_names_the_environment_variable(tmp_path):
    path = tmp_path / "nowhere.yaml"
    (problem,) = problems_of(path)
    assert str(path) in problem and "no such file" in problem and INVENTORY_ENV in problem


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(
        tmp_path,
        """
        setings: {}
        settings:
          driver_branch: 580
          reboot_policy: sometimes
        groups:
          workstation:
            hosts: {ws09: {}}
          workstations:
            hosts:
              ws01:
                ssh_port: "22x"
                sudo: "yes"
                reboot_policy: never
              ws02:
                settings:
                  venv_path: opt/venv
                  build_user: root
          wsl:
            hosts:
              ws01: {}
        """,
    )
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    lines = [int(p[len(str(path)) + 1 :].split(":")[0]) for p in caught.value.problems]
    assert lines == [1, 3, 4, 6, 11, 12, 13, 16, 17, 20]
    assert str(caught.value).startswith(f"{path}: 10 problem(s), nothing was contacted:")


def test_shipped_inventory_loads_the_control_machine():
    inventory = load_inventory(DEFAULT_INVENTORY)
    assert [(h.name, h.group) for h in inventory.hosts] == [("@local", "workstations")]
    assert inventory.group("workstations") == [("@local", {"gpufleet_group": "workstations"})]
    assert inventory.group("wsl") == []


def test_inventory_path_comes_from_the_environment(tmp_path, monkeypatch):
    path = write(tmp_path, ONE_HOST, name="lab.yaml")
    monkeypatch.setenv(INVENTORY_ENV, str(path))
    inventory = load_inventory()
    assert inventory.path == path
    assert [h.name for h in inventory.hosts] == ["ws01"]


THREE_LEVELS = """
settings:
  reboot_policy: never
  driver_branch: "575"
  min_memory_gb: 8
groups:
  workstations:
    settings:
      driver_branch: "580"
      cuda_version: "12.8"
    hosts:
      ws01:
        address: 192.0.2.11
        ssh_user: admin
        ssh_port: 2222
        ssh_key: ~/.ssh/id_ed25519
        sudo: true
      ws02:
        settings:
          driver_branch: "590"
          reboot_policy: auto
  wsl:
    hosts:
      desk-07:
        address: 192.0.2.40
        sudo: false
        settings:
          xformers_builder: ws01
"""


def test_host_settings_beat_group_settings_beat_fleet_settings(tmp_path):
    inventory = load_inventory(write(tmp_path, THREE_LEVELS))
    by_name = {h.name: h for h in inventory.hosts}
    assert by_name["ws01"].settings == {
        "reboot_policy": "never",
        "driver_branch": "580",
        "min_memory_gb": 8,
        "cuda_version": "12.8",
    }
    assert by_name["ws02"].settings["driver_branch"] == "590"
    assert by_name["ws02"].settings["reboot_policy"] == "auto"
    assert by_name["desk-07"].settings == {
        "reboot_policy": "never",
        "driver_branch": "575",
        "min_memory_gb": 8,
        "xformers_builder": "ws01",
    }


def test_connection_keys_become_pyinfra_ssh_data_with_strict_host_keys(tmp_path):
    inventory = load_inventory(write(tmp_path, THREE_LEVELS))
    groups = {name: dict(inventory.group(name)) for name in ("workstations", "wsl")}
    ws01 = groups["workstations"]["ws01"]
    assert ws01["ssh_hostname"] == "192.0.2.11"
    assert ws01["ssh_user"] == "admin"
    assert ws01["ssh_port"] == 2222
    assert ws01["ssh_key"] == os.path.expanduser("~/.ssh/id_ed25519")
    assert ws01["_sudo"] is True
    assert ws01["ssh_strict_host_key_checking"] == "yes"
    assert ws01["gpufleet_group"] == "workstations"
    assert groups["workstations"]["ws02"]["ssh_hostname"] == "ws02"
    desk = groups["wsl"]["desk-07"]
    assert desk["gpufleet_group"] == "wsl"
    assert "_sudo" not in desk


def test_every_default_in_all_py_passes_its_own_validation():
    settings = load_settings()
    assert settings, "group_data/all.py declares no settings"
    for name, setting in settings.items():
        assert validate_value(name, setting.default, settings) is None, name


class Listener:
    """A TCP listener on loopback that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener():
    listening = Listener()
    yield listening
    listening.close()


def cli_inventory(tmp_path: Path, port: int, driver_branch: str) -> Path:
    return write(
        tmp_path,
        f"""
        groups:
          workstations:
            hosts:
              ws01:
                address: 127.0.0.1
                ssh_port: {port}
                ssh_known_hosts_file: {tmp_path}/known_hosts
                settings:
                  driver_branch: {driver_branch}
        """,
    )


def test_pyinfra_with_a_malformed_inventory_exits_before_contacting_any_host(tmp_path, listener):
    path = cli_inventory(tmp_path, listener.port, "580")
    result = run_pyinfra("-y", "inventory.py", "deploys/preflight.py", env={INVENTORY_ENV: str(path)})
    assert result.returncode != 0
    assert f"{path}:9: host 'ws01' setting 'driver_branch': got 580" in result.stderr
    assert "nothing was contacted" in result.stderr
    assert listener.connections == 0


def test_pyinfra_with_the_same_inventory_made_valid_does_connect(tmp_path, listener):
    # The counterpart of the test above: proves the listener sees pyinfra when pyinfra does connect.
    path = cli_inventory(tmp_path, listener.port, '"580"')
    result = run_pyinfra("-y", "inventory.py", "deploys/preflight.py", env={INVENTORY_ENV: str(path)})
    assert result.returncode != 0
    assert "invalid inventory" not in result.stderr
    assert listener.connections >= 1
