"""Root never trusts what the build user wrote, and no value reaches a shell unquoted.

The commands built here are run for real in bash (in temporary directories) with hostile values: a command that
quoted them wrongly would leave a `pwned` file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import tempfile
from pathlib import Path

import pytest
from pyinfra.facts.files import Directory, FileContents

from gpufleet import cache, cache_stats, facts
from gpufleet.buildplan import (
    ManifestError,
    build_paths,
    finished_wheel,
    host_layout,
    install_commands,
    parse_manifest,
)
from gpufleet.cli import cache_stats_argv
from gpufleet.decide import build_account_problems
from gpufleet.nvidia_repo import keyring_command
from gpufleet.operations import cached_wheel, check_staged_commands, stage_commands
from gpufleet.settings import load_settings

DEFAULTS = {name: s.default for name, s in load_settings().items()}
SHA = "ab" * 32
WHEEL = "xformers-0.0.35-cp312-cp312-linux_x86_64.whl"


def bash(command: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=cwd, timeout=30)


def manifest(wheel: object = WHEEL, sha: object = SHA, fingerprint: str = "fp1") -> str:
    return json.dumps({"fingerprint": fingerprint, "wheel": wheel, "wheel_sha256": sha})


@pytest.mark.parametrize("wheel", [
    "../escaped.whl",
    "xformers-0.0.35.whl/../../../etc/cron.d/x.whl",
    "x.whl' ; touch /tmp/pwned ; echo '",
    "xformers-0.0.35$(id).whl",
    "xformers-0.0.35.whl\n",
    "/etc/passwd",
    "xformers-0.0.35 .whl",
    42,
], ids=["dotdot", "slash", "quote-injection", "command-substitution", "newline", "absolute", "space", "not-text"])
def test_a_forged_wheel_name_is_refused_with_the_manifest_named(wheel):
    with pytest.raises(ManifestError, match=r"ws01:/w/manifest.json names the wheel .* no xformers wheel file name"):
        parse_manifest(manifest(wheel=wheel), "fp1", "ws01:/w/manifest.json")
    with pytest.raises(ManifestError):
        finished_wheel(manifest(wheel=wheel), "fp1")


def test_a_forged_checksum_is_refused():
    with pytest.raises(ManifestError, match="sha256 as '; rm -rf /', not 64 hex digits"):
        parse_manifest(manifest(sha="; rm -rf /"), "fp1")


def test_a_manifest_of_another_fingerprint_is_no_finished_build_and_never_refused():
    assert parse_manifest(manifest(wheel="../x.whl", fingerprint="fp0"), "fp1") is None


def test_a_cached_wheel_that_resolves_outside_the_cache_is_refused(tmp_path):
    cache_dir, outside = tmp_path / "cache", tmp_path / "outside.whl"
    cache_dir.mkdir()
    outside.write_text("x")
    (cache_dir / WHEEL).symlink_to(outside)
    with pytest.raises(RuntimeError, match="leads outside the wheel cache"):
        cached_wheel(str(cache_dir), {"wheel": WHEEL})
    (cache_dir / WHEEL).unlink()
    assert cached_wheel(str(cache_dir), {"wheel": WHEEL}) == (cache_dir / WHEEL).resolve()


def staged(tmp_path: Path, content: bytes = b"wheel bytes") -> tuple[Path, Path, object]:
    """A staging directory holding a wheel and its checksum line as root writes them, and a python that logs argv."""
    layout = host_layout(str(tmp_path / "work"), "0.0.35", "fp1")
    staging = Path(layout.staging.replace("/var/lib/gpufleet-root", str(tmp_path / "root-state")))
    staging.mkdir(parents=True)
    (staging / WHEEL).write_bytes(content)
    good = {"wheel": WHEEL, "wheel_sha256": hashlib.sha256(content).hexdigest()}
    assert bash("\n".join(check_staged_commands(str(staging), good))).returncode == 0
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/pip-argv\n")
    python.chmod(0o755)
    layout = type(layout)(**{**layout.__dict__, "staging": str(staging)})
    return staging, python, layout


def test_install_checks_the_sha256_and_installs_exactly_the_staged_file(tmp_path):
    staging, python, layout = staged(tmp_path)
    result = bash("\n".join(install_commands(str(python), layout)))
    assert result.returncode == 0, result.stderr
    argv = (tmp_path / "pip-argv").read_text().split()
    assert argv == ["-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", f"{staging}/{WHEEL}"]


def test_a_wheel_changed_after_staging_is_never_installed(tmp_path):
    staging, python, layout = staged(tmp_path)
    (staging / WHEEL).write_bytes(b"something else")
    result = bash("\n".join(install_commands(str(python), layout)))
    assert result.returncode != 0
    assert not (tmp_path / "pip-argv").exists()


def test_a_checksum_line_naming_another_file_installs_nothing(tmp_path):
    staging, python, layout = staged(tmp_path)
    evil = tmp_path / "evil.whl"
    evil.write_bytes(b"evil")
    (staging / "wheel.sha256").write_text(f"{hashlib.sha256(b'evil').hexdigest()}  ../evil.whl\n")
    result = bash("\n".join(install_commands(str(python), layout)))
    assert result.returncode != 0
    assert not (tmp_path / "pip-argv").exists()


@pytest.fixture
def shared_dir():
    """A directory every user can enter (pytest's tmp_path is root's only), removed after."""
    path = Path(tempfile.mkdtemp(prefix="gpufleet-root-safety-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", "--", str(path)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="staging runs as root and reads as another user (su)")
def test_staging_reads_the_wheel_as_the_build_user_so_a_planted_link_to_a_root_file_fails(shared_dir):
    secret = shared_dir / "root-only"
    secret.write_text("root's secret")
    secret.chmod(0o600)
    out = shared_dir / "out"
    out.mkdir()
    (out / WHEEL).symlink_to(secret)
    staging = shared_dir / "staging"
    wheel = {"wheel": WHEEL, "wheel_sha256": hashlib.sha256(b"root's secret").hexdigest()}
    result = bash(" && ".join(stage_commands(str(staging), wheel, str(out / WHEEL), "nobody")))
    assert result.returncode != 0
    assert (staging / WHEEL).read_text() == ""
    assert (staging.stat().st_uid, oct(staging.stat().st_mode & 0o777)) == (0, "0o755")


@pytest.mark.skipif(os.geteuid() != 0, reason="staging runs as root and reads as another user (su)")
def test_staging_copies_a_readable_wheel_and_checks_it(shared_dir):
    out = shared_dir / "out"
    out.mkdir()
    (out / WHEEL).write_bytes(b"real wheel")
    out.chmod(0o755)
    (out / WHEEL).chmod(0o644)
    staging = shared_dir / "staging"
    wheel = {"wheel": WHEEL, "wheel_sha256": hashlib.sha256(b"real wheel").hexdigest()}
    commands = [*stage_commands(str(staging), wheel, str(out / WHEEL), "nobody"),
                *check_staged_commands(str(staging), wheel)]
    assert bash(" && ".join(commands)).returncode == 0
    assert (staging / "wheel.sha256").read_text() == f"{wheel['wheel_sha256']}  {WHEEL}\n"


def test_keyring_is_checked_in_the_same_command_that_extracts_it(tmp_path):
    command = keyring_command(str(tmp_path / "k.deb"), SHA)
    check, _, extract = command.partition(" && ")
    assert check == f"echo '{SHA}  {tmp_path}/k.deb' | sha256sum -c --quiet"
    assert extract.startswith(f"dpkg-deb --fsys-tarfile {tmp_path}/k.deb | tar -xO ./usr/share/keyrings/")
    (tmp_path / "k.deb").write_text("not the keyring")
    # Run only the check: a wrong file stops the command before dpkg-deb.
    assert bash(check).returncode != 0


def test_planted_links_in_the_build_users_tree_are_found(tmp_path):
    layout = host_layout(str(tmp_path), "0.0.35", "fp1")
    Path(layout.patch_dir).mkdir(parents=True)
    Path(layout.out_dir).parent.mkdir(parents=True)
    Path(layout.out_dir).symlink_to("/etc/cron.d")
    (Path(layout.patch_dir) / "series").symlink_to("/etc/shadow")
    paths, trees = build_paths(layout, str(tmp_path))
    output = bash(facts.PlantedLinks().command(paths=paths, trees=trees)).stdout.splitlines()
    assert sorted(facts.PlantedLinks().process(output)) == sorted([
        f"{layout.out_dir} -> /etc/cron.d", f"{layout.patch_dir}/series -> /etc/shadow"])


HOSTILE_PATH = "{tmp}/a b; touch {tmp}/pwned; echo $(touch {tmp}/pwned2)"


@pytest.mark.parametrize("fact, kwargs", [
    (FileContents, {"path": HOSTILE_PATH}),
    (Directory, {"path": HOSTILE_PATH}),
    (facts.PythonVersion, {"python": HOSTILE_PATH}),
    (facts.PythonHeaders, {"python": HOSTILE_PATH}),
    (facts.PipFreeze, {"python": HOSTILE_PATH}),
    (facts.InstalledDistributions, {"python": HOSTILE_PATH}),
    (facts.TorchInfo, {"python": HOSTILE_PATH}),
    (facts.NvccVersion, {"cuda_home": HOSTILE_PATH}),
    (facts.FreeDisk, {"path": HOSTILE_PATH}),
    (facts.Account, {"user": "x; touch {tmp}/pwned"}),
    (facts.PlantedLinks, {"paths": [HOSTILE_PATH], "trees": [HOSTILE_PATH]}),
    (facts.DevpiMirrors, {"base": HOSTILE_PATH, "indexes": [HOSTILE_PATH]}),
    (facts.DevpiIndexFiles, {"index_url": HOSTILE_PATH}),
], ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_fact_commands_quote_what_they_are_given(tmp_path, fact, kwargs):
    filled = {k: ([x.format(tmp=tmp_path) for x in v] if isinstance(v, list) else v.format(tmp=tmp_path))
              for k, v in kwargs.items()}
    bash(str(fact().command(**filled)))
    assert not list(tmp_path.glob("pwned*"))


def test_cache_stats_command_quotes_the_cache_dir(tmp_path):
    bash(cache_stats.stats_command(f"{tmp_path}/c; touch {tmp_path}/pwned"))
    assert not (tmp_path / "pwned").exists()


def test_a_kernel_release_that_is_no_release_never_reaches_the_cache_hosts_shell():
    packages = cache.apt_warm_packages(DEFAULTS, ["6.8.0-45-generic", "6.1; touch /tmp/pwned", "$(id)", "6.1\n"])
    assert [p for p in packages if p.startswith("linux-headers-")] == ["linux-headers-6.8.0-45-generic"]
    text = "\n".join(cache.apt_warm_commands(DEFAULTS, ["debian12"], packages, "/srv/c/warm-apt"))
    assert "pwned" not in text and "$(id)" not in text


def test_a_valid_url_that_needs_quoting_stays_one_argument_in_the_warm_commands():
    # '&' and '?' pass URL validation and mean something to a shell.
    url = "https://mirror.lab/simple/?token=a&b=c"
    commands = cache.warm_commands({**DEFAULTS, "pip_index_url": url}, "/opt/v/bin/python",
                                   "http://127.0.0.1:3141", ["pip"], "/srv/c/w")
    assert all(shlex.split(c) for c in commands)
    mirrors = cache.mirror_urls({**DEFAULTS, "pip_index_url": url})
    assert mirrors["root/pypi"] == url
    config = cache.acng_config({**DEFAULTS, "pip_index_url": url}, ["10.0.0.5"])
    line = next(l for l in config.splitlines() if l.startswith("PassThroughPattern:"))
    assert "|mirror\\.lab:443)$" in line, line


def test_apt_cacher_ng_tunnels_only_the_configured_https_upstreams():
    text = cache.acng_config(DEFAULTS, ["10.0.0.5"])
    line = next(l for l in text.splitlines() if l.startswith("PassThroughPattern:"))
    assert line == ("PassThroughPattern: ^(developer\\.download\\.nvidia\\.com:443|download\\.pytorch\\.org:443|"
                    "files\\.pythonhosted\\.org:443)$")
    assert ".*" not in line
    http_only = {**DEFAULTS, "cuda_repo_url": "http://10.0.0.1/cuda", "torch_index_url": "http://10.0.0.1/whl",
                 "xformers_source_url": "http://10.0.0.1/x.tar.gz"}
    assert "PassThroughPattern: ^$" in cache.acng_config(http_only, ["10.0.0.5"])


def test_apt_cacher_ng_tunnels_an_https_mirror_at_its_own_port_and_nothing_else_there():
    mirror = {**DEFAULTS, "cuda_repo_url": "https://10.0.0.1:8443/cuda", "pip_index_url": "https://10.0.0.1:8443/s/",
              "torch_index_url": "https://10.0.0.1:8443/s/", "xformers_source_url": "http://10.0.0.1:8047/x.tar.gz"}
    pattern = cache.pass_through_pattern(mirror)
    assert pattern == "^(10\\.0\\.0\\.1:8443)$"
    assert re.fullmatch(pattern[1:-1], "10.0.0.1:8443")
    for refused in ("10.0.0.1:443", "10.0.0.1:8047", "10.0.0.1:22", "10.0.0.10:8443", "10.0.0.1:84430",
                    "10x0x0x1:8443"):
        assert not re.search(pattern, refused), refused


def test_cache_stats_puts_the_destination_after_double_dash():
    argv = cache_stats_argv(["ssh", "-o", "BatchMode=yes"], "admin", "cache.lab", "true")
    assert argv == ["ssh", "-o", "BatchMode=yes", "--", "admin@cache.lab", "true"]


def account(uid: int, home: str, groups: list[str]) -> dict:
    return {"name": "x", "uid": uid, "home": home, "shell": "/bin/bash", "groups": groups}


@pytest.mark.parametrize("found, fragment", [
    (account(1000, "/home/ubuntu", ["ubuntu", "sudo"]), "in group sudo (may act as root)"),
    (account(1, "/usr/sbin", ["daemon"]), "with its own home /usr/sbin"),
    (account(0, "/root", ["root"]), "a root account (uid 0)"),
    (account(1001, "/home/student", ["student"]), "with its own home /home/student"),
], ids=["admin", "system-account", "uid-0", "a-person"])
def test_build_user_that_is_someone_elses_account_is_refused(found, fragment):
    problems = build_account_problems(found, {**DEFAULTS, "build_user": "x"})
    assert len(problems) == 1 and fragment in problems[0] and "setting build_user 'x'" in problems[0]


def test_build_user_gpufleet_made_earlier_or_not_yet_there_is_accepted():
    assert build_account_problems(None, DEFAULTS) == []
    assert build_account_problems(account(998, DEFAULTS["work_dir"], ["gpufleet"]), DEFAULTS) == []


def test_account_fact_reads_a_real_account_here():
    output = bash(facts.Account().command(user="daemon")).stdout.splitlines()
    found = facts.Account().process(output)
    assert found["uid"] == 1 and found["home"] == "/usr/sbin"
    assert facts.Account().process(bash(facts.Account().command(user="no-such-user-x")).stdout.splitlines()) is None
