"""Hostile inventories: every value that could reach a root shell, an apt or pip configuration or ssh's command line
is refused before any host is contacted, with a message that names the setting and the fix; a malformed file (tags,
encoding, alias bombs, deep nesting, a directory) is one clear line and exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gpufleet.inventory import InventoryError, load_inventory
from gpufleet.settings import REPO_ROOT

SHA = "a" * 64


def inventory(settings: dict | None = None, host: dict | None = None, name: str = "ws01", cache: bool = False) -> dict:
    """One workstation (optionally also the cache host) with fleet settings and host connection keys."""
    text: dict = {"groups": {"workstations": {"hosts": {name: host or {"address": "192.0.2.11"}}}}}
    if settings:
        text["settings"] = settings
    if cache:
        text["groups"]["cache"] = {"hosts": {name: {}}}
    return text


# (id, inventory, fragments the one problem must contain)
HOSTILE = [
    ("venv_path_with_a_command", inventory({"venv_path": "/opt/v; touch /tmp/pwned"}),
     ["setting 'venv_path'", "letters, digits and . _ + - / only"]),
    ("work_dir_with_command_substitution", inventory({"work_dir": "/var/lib/g$(id>/tmp/p)"}),
     ["setting 'work_dir'", "no spaces, quotes or shell characters"]),
    ("cache_dir_with_a_space", inventory({"cache_dir": "/srv/lab cache"}, cache=True),
     ["setting 'cache_dir'", "letters, digits and . _ + - / only"]),
    ("venv_path_is_root", inventory({"venv_path": "/"}), ["setting 'venv_path'", "not the system directory /"]),
    ("venv_path_is_tmp", inventory({"venv_path": "/tmp"}), ["not the system directory /tmp"]),
    ("venv_path_under_tmp", inventory({"venv_path": "/tmp/venv"}), ["a path outside /tmp"]),
    ("venv_path_in_roots_home", inventory({"venv_path": "/root/venv"}), ["a path outside /root"]),
    ("work_dir_is_etc", inventory({"work_dir": "/etc"}), ["setting 'work_dir'", "not the system directory /etc"]),
    ("work_dir_is_usr_local", inventory({"work_dir": "/usr/local"}), ["not the system directory /usr/local"]),
    ("cache_dir_in_proc", inventory({"cache_dir": "/proc/self"}, cache=True), ["a path outside /proc"]),
    ("work_dir_climbs_with_dotdot", inventory({"work_dir": "/var/lib/../etc"}), ["no '..'", "'/var/etc'"]),
    ("work_dir_with_trailing_slash", inventory({"work_dir": "/var/lib/gpufleet/"}), ["in normal form"]),
    ("work_dir_relative", inventory({"work_dir": "var/lib/gpufleet"}), ["an absolute path"]),
    ("work_dir_is_roots_staging_directory", inventory({"work_dir": "/var/lib/gpufleet-root"}),
     ["a path outside /var/lib/gpufleet-root, root's own directory"]),
    ("work_dir_inside_the_venv", inventory({"work_dir": "/opt/gpufleet/venv/work"}),
     ["setting 'work_dir'", "must not be the venv or lie inside venv_path"]),
    ("cuda_home_with_a_space", inventory({"cuda_existing_home": "/usr/local/cuda 13"}),
     ["setting 'cuda_existing_home'", "no spaces"]),
    ("interpreter_with_a_newline", inventory({"python_interpreter": "/usr/bin/python3\n"}),
     ["setting 'python_interpreter'", "no spaces"]),
    ("address_with_a_command", inventory(host={"address": "192.0.2.11; rm -rf /"}),
     ["address", "a host name (RFC 1123"]),
    ("address_that_is_an_ssh_option", inventory(host={"address": "-oProxyCommand=touch /tmp/p"}),
     ["address", "a host name (RFC 1123"]),
    ("address_carrying_apt_configuration",
     inventory(host={"address": '10.0.0.1"; APT::Get::AllowUnauthenticated "true'}), ["a host name (RFC 1123"]),
    ("address_with_a_trailing_newline", inventory(host={"address": "ws01.lab\n"}), ["a host name (RFC 1123"]),
    ("host_name_with_a_trailing_newline", inventory(name="ws01\n", host={}), ["not a valid host name"]),
    ("host_name_with_a_semicolon", inventory(name="ws01;id", host={}), ["not a valid host name"]),
    ("host_name_with_arabic_digits", inventory(name="ws\u0660\u0661", host={}), ["not a valid host name"]),
    ("ssh_user_with_a_command", inventory(host={"address": "192.0.2.11", "ssh_user": "admin; id"}),
     ["ssh_user", "a user name"]),
    ("ssh_key_that_is_an_option", inventory(host={"address": "192.0.2.11", "ssh_key": "-oProxyCommand=id"}),
     ["ssh_key", "a leading '-'"]),
    ("repo_url_injecting_an_acng_line", inventory({"cuda_repo_url": "https://x\nPassThroughPattern: .*"}),
     ["setting 'cuda_repo_url'", "a URL starting with http://"]),
    ("index_url_with_ftp", inventory({"torch_index_url": "ftp://mirror.lab/whl/"}), ["a URL starting with http://"]),
    ("index_url_with_an_extra_pip_option", inventory({"pip_index_url": "https://m.lab/simple --trusted-host evil"}),
     ["setting 'pip_index_url'", "without spaces"]),
    ("sdist_url_with_a_semicolon", inventory({"xformers_source_url": "https://m.lab/x.tar.gz;id"}),
     ["setting 'xformers_source_url'", "; $ ( )"]),
    ("url_without_a_host", inventory({"cuda_repo_url": "https://"}), ["a valid host name"]),
    ("url_with_a_quote", inventory({"torch_index_url": "https://m.lab/'x"}), ["without spaces, quotes"]),
    ("python_version_with_a_newline", inventory({"python_version": "3.12\n"}), ["major.minor such as \"3.12\""]),
    ("python_version_out_of_range", inventory({"python_version": "99.99"}), ["major.minor such as \"3.12\""]),
    ("cuda_version_out_of_range", inventory({"cuda_version": "99.99"}), ["major.minor such as \"12.8\""]),
    ("cuda_version_in_fullwidth_digits", inventory({"cuda_version": "\uff11\uff12.\uff18"}), ["major.minor"]),
    ("driver_branch_zero", inventory({"driver_branch": "000"}), ["a driver branch such as \"580\""]),
    ("driver_branch_in_arabic_digits", inventory({"driver_branch": "\u0665\u0668\u0660"}), ["a driver branch"]),
    ("xformers_version_with_a_v", inventory({"xformers_version": "v0.0.35"}),
     ["spelt exactly as pip spells it", "(write '0.0.35')"]),
    ("torch_version_with_a_newline", inventory({"torch_version": "2.12.0\n"}), ["a version such as"]),
    ("sdist_sha256_with_a_newline", inventory({"xformers_source_sha256": SHA + "\n"}), ["64 lowercase hex digits"]),
    ("keyring_checksum_for_a_path", inventory({"cuda_keyring_sha256": {"../x": SHA}}),
     ["repository directory names such as ubuntu2404"]),
    ("arch_list_with_a_command", inventory({"xformers_arch_list": ["12.0; rm -rf /"]}), ["entries like \"12.0\""]),
    ("trusted_host_with_a_newline", inventory({"pip_trusted_hosts": ["mirror.lab\nindex-url = x"]}),
     ["setting 'pip_trusted_hosts'", "entries like"]),
    ("build_user_daemon", inventory({"build_user": "daemon"}), ["not the existing system account 'daemon'"]),
    ("build_user_ubuntu", inventory({"build_user": "ubuntu"}), ["not the existing system account 'ubuntu'"]),
    ("build_user_root", inventory({"build_user": "root"}), ["not root"]),
    ("build_user_is_the_ssh_admin",
     inventory({"build_user": "alice"}, host={"address": "192.0.2.11", "ssh_user": "alice"}),
     ["setting 'build_user'", "the account gpufleet logs in as", "lock you out"]),
    ("cache_port_is_ssh", inventory({"cache_apt_port": 22}, cache=True), ["setting 'cache_apt_port'", "SSH's port"]),
    ("cache_ports_equal", inventory({"cache_apt_port": 3141}, cache=True),
     ["cache_apt_port and cache_pip_port are both 3141"]),
    ("cache_listen_everywhere", inventory({"cache_listen": ["0.0.0.0"]}, cache=True),
     ["0.0.0.0 opens the cache to every network", "cache_listen_any: true"]),
    ("cache_listen_a_name", inventory({"cache_listen": ["cache.lab"]}, cache=True), ["an IP address of the cache host"]),
    ("reboot_timeout_of_a_second", inventory({"reboot_timeout": 1}), ["at least 30"]),
    ("smoke_heads_zero", inventory({"smoke_heads": 0}), ["a number above 0"]),
    ("builder_with_a_command", inventory({"xformers_builder": "ws01; id"}), ["a host name of this inventory"]),
    ("report_dir_with_a_newline", inventory({"report_dir": "reports\nx"}), ["a path without spaces"]),
    ("string_setting_with_a_tab", inventory({"wheel_cache_dir": "wheels\tx"}), ["a path without spaces"]),
]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "hosts.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


@pytest.mark.parametrize("data, fragments", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_value_is_refused_before_contact_with_the_fix(tmp_path, data, fragments):
    path = write(tmp_path, data)
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    problems = caught.value.problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:"), problems[0]
    for fragment in fragments:
        assert fragment in problems[0], problems[0]
    assert "nothing was contacted" in str(caught.value)


def test_the_table_holds_forty_cases_or_more():
    assert len(HOSTILE) >= 40


def test_listening_everywhere_is_accepted_when_said_explicitly_with_a_warning(tmp_path, capsys):
    path = write(tmp_path, inventory({"cache_listen": ["0.0.0.0"], "cache_listen_any": True}, cache=True))
    assert load_inventory(path).cache_host.name == "ws01"
    assert "listens on every network (cache_listen_any)" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["/opt/gpufleet/venv", "/srv/gpu-fleet/v3.12+cu128", "/home/student/.venv"])
def test_plain_paths_below_system_directories_are_accepted(tmp_path, value):
    load_inventory(write(tmp_path, inventory({"venv_path": value})))


ALIAS_BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['x'] * 9)}]\n"
    for prev, name in zip([None, "a", "b", "c", "d", "e", "f"], "abcdefg")
) + "settings: {pip_trusted_hosts: *g}\n"

# (id, file content, fragment of the one-line error)
MALFORMED_FILES = [
    ("python_object_tag", "settings: !!python/object/apply:os.system ['touch /tmp/p']\n",
     ":1: YAML tag tag:yaml.org,2002:python/object/apply:os.system is not allowed"),
    ("env_tag", "settings:\n  work_dir: !env HOME\n", ":2: YAML tag !env is not allowed"),
    ("binary_tag", "settings:\n  work_dir: !!binary aGk=\n", "YAML tag tag:yaml.org,2002:binary is not allowed"),
    ("invalid_utf8", b"settings:\n  work_dir: /var/lib/\xff\n", ":2: not UTF-8 text (byte 0xff)"),
    ("alias_bomb", ALIAS_BOMB, "expands to more than 100000 values through YAML aliases"),
    ("deep_flow_nesting", "a: " + "[" * 5000 + "]" * 5000 + "\n", ":1: nested more than 32 levels deep"),
    ("deep_mapping_nesting", "a: " + "{a: " * 5000 + "}" * 5000 + "\n", "nested more than 32 levels deep"),
    ("huge_file", "# " + "x" * (2 * 1024 * 1024) + "\n", "is larger than 1024 KiB"),
]


def check_inventory(path: Path) -> tuple[subprocess.CompletedProcess, float]:
    """The command's result, and how long the checker itself took (in this process: interpreter start-up on a busy
    machine is not the checker's time)."""
    result = subprocess.run([sys.executable, "-m", "gpufleet.cli", "check-inventory", str(path)],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=30)
    start = time.monotonic()
    with pytest.raises(InventoryError):
        load_inventory(path)
    return result, time.monotonic() - start


@pytest.mark.parametrize("content, fragment", [c[1:] for c in MALFORMED_FILES], ids=[c[0] for c in MALFORMED_FILES])
def test_malformed_file_is_one_line_and_exit_2_within_two_seconds(tmp_path, content, fragment):
    path = tmp_path / "hosts.yaml"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    result, seconds = check_inventory(path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and fragment in lines[1], result.stderr
    assert seconds < 2, f"check-inventory took {seconds:.1f} s"


def test_a_directory_given_as_the_inventory_says_so(tmp_path):
    result, seconds = check_inventory(tmp_path)
    assert result.returncode == 2
    assert f"{tmp_path}: is a directory; pass the inventory YAML file itself" in result.stderr
    assert "no such file" not in result.stderr and "Traceback" not in result.stderr
    assert seconds < 2
