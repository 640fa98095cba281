"""gpufleet's own pyinfra operations. Each docstring says what makes it a no-op."""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from io import StringIO
from pathlib import Path

from packaging.utils import canonicalize_name
from pyinfra import host, logger
from pyinfra.api import FunctionCommand, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import Directory, File, Sha1File
from pyinfra.operations import files

from gpufleet.buildplan import parse_manifest, staged_checksum_line
from gpufleet.cache import index_files, index_wheel_name, upload_command, wheel_file_url
from gpufleet.decide import torch_problems
from gpufleet.fact_memo import expect, fact
from gpufleet.facts import TORCH_PROBE, InstalledDistributions, parse_torch_info, record_torch_state_command
from gpufleet.fingerprint import file_sha256


@operation(is_idempotent=False)
def refuse(reasons: list[str]):
    """Fail this host with the reasons on stderr. Never a no-op: it exists to stop the host."""
    text = "\n".join(f"gpufleet refuses this host: {r}" for r in reasons)
    yield f"echo {shlex.quote(text)} >&2; exit 1"


def put_file(**arguments) -> OperationMeta:
    """pyinfra's files.put; the path questions it will ask of dest go to the host with its others in one round trip
    (gpufleet.fact_memo.expect). A no-op when dest has src's content, owner and mode."""
    expect(host, File, path=arguments["dest"])
    expect(host, Sha1File, path=arguments["dest"])
    if arguments.get("create_remote_dir", True):
        expect(host, Directory, path=posixpath.dirname(arguments["dest"]))
    return files.put(**arguments)


def make_directory(**arguments) -> OperationMeta:
    """pyinfra's files.directory; its question about path goes with the host's others (gpufleet.fact_memo.expect).
    A no-op when path is a directory with that owner and mode."""
    expect(host, Directory, path=arguments["path"])
    return files.directory(**arguments)


def _as_root(host) -> dict:
    """Connector arguments for a command a FunctionCommand runs as root (sudo where the inventory says so)."""
    return {"_sudo": True} if host.data.get("_sudo") else {}


def _run(host, command: str, **arguments) -> tuple[bool, str]:
    ok, output = host.run_shell_command(command, **_as_root(host), **arguments)
    return ok, output.stdout


def _finished_build(host, remote_dir: str, fingerprint: str, user: str) -> dict:
    """The manifest of the finished build of fingerprint in remote_dir on host, read as the build user."""
    where = f"{host.name}:{remote_dir}/manifest.json"
    ok, output = _run(host, f"cat -- {shlex.quote(remote_dir + '/manifest.json')}", _su_user=user)
    if not ok:
        raise RuntimeError(f"{host.name} has no finished build in {remote_dir} (manifest.json missing)")
    manifest = parse_manifest(output, fingerprint, where)
    if manifest is None:
        raise RuntimeError(f"{where} is not a finished build of fingerprint {fingerprint}")
    return manifest


def cached_wheel(local_dir: str, manifest: dict) -> Path:
    """The wheel's path in this machine's cache; a name resolving outside the cache directory is refused."""
    cache = Path(local_dir).resolve()
    wheel = (cache / manifest["wheel"]).resolve()
    if wheel.parent != cache:
        raise RuntimeError(f"wheel name {manifest['wheel']!r} leads outside the wheel cache {cache}; refused")
    return wheel


def stage_commands(staging: str, manifest: dict, source: str | None = None, user: str | None = None) -> list[str]:
    """Root's staging directory for one fingerprint, made fresh; with `source`, the wheel copied into it, read as
    `user` (root never opens a path the build user controls), and its sha256 checked there."""
    quoted = shlex.quote(staging)
    commands = [f"umask 022 && rm -rf {quoted} && mkdir -p {quoted} && chown -h root:root {quoted}"]
    if source is not None:
        read = shlex.quote(f"cat -- {shlex.quote(source)}")
        commands.append(f"su -s /bin/sh -c {read} {shlex.quote(user or 'nobody')} > "
                        f"{shlex.quote(staging + '/' + manifest['wheel'])}")
    return commands


def check_staged_commands(staging: str, manifest: dict) -> list[str]:
    """The staged wheel's checksum line written by root, then checked."""
    quoted = shlex.quote(staging)
    # Readable by the build user, who installs it; writable by root only.
    return [f"printf '%s' {shlex.quote(staged_checksum_line(manifest))} > {quoted}/wheel.sha256 && "
            f"cd {quoted} && chmod 644 wheel.sha256 {shlex.quote(manifest['wheel'])} && "
            "sha256sum -c --quiet wheel.sha256"]


@operation(is_idempotent=False)
def fetch_built_wheel(remote_dir: str, staging: str, local_dir: str, fingerprint: str, user: str):
    """Stage the builder's wheel in root's directory and copy it to this machine's cache, sha256 checked each way.

    The manifest and the wheel live in the build user's directory: both are read as the build user, the manifest
    checked (parse_manifest), the wheel copied into root's staging directory and checked against it. Only planned
    on the builder when its wheel is not cached yet; the manifest is written last, so a broken copy never looks
    finished.
    """

    def fetch(state, host) -> bool:
        manifest = _finished_build(host, remote_dir, fingerprint, user)
        wheel = cached_wheel(local_dir, manifest)
        for command in [*stage_commands(staging, manifest, f"{remote_dir}/{manifest['wheel']}", user),
                        *check_staged_commands(staging, manifest)]:
            ok, _ = _run(host, command)
            if not ok:
                raise RuntimeError(f"{manifest['wheel']} on {host.name} does not match "
                                   f"{host.name}:{remote_dir}/manifest.json's sha256")
        wheel.parent.mkdir(parents=True, exist_ok=True)
        if not host.get_file(f"{staging}/{manifest['wheel']}", str(wheel), **_as_root(host)):
            raise RuntimeError(f"could not fetch {manifest['wheel']} from {host.name}")
        if file_sha256(wheel) != manifest["wheel_sha256"]:
            wheel.unlink()
            raise RuntimeError(f"{manifest['wheel']} from {host.name} does not match its manifest's sha256")
        (wheel.parent / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return True

    yield FunctionCommand(fetch, (), {})


@operation(is_idempotent=False)
def push_built_wheel(local_dir: str, staging: str, fingerprint: str):
    """Upload the cached wheel into root's staging directory on a host that needs it, sha256 checked there (only
    planned for such hosts)."""

    def push(state, host) -> bool:
        manifest_path = Path(local_dir) / "manifest.json"
        if not manifest_path.is_file():
            raise RuntimeError(
                f"no built wheel in {local_dir}: the builder failed earlier in this run; fix it (see its build.log) "
                "or set xformers_builder to another host, then run again"
            )
        manifest = parse_manifest(manifest_path.read_text(), fingerprint, str(manifest_path))
        if manifest is None:
            raise RuntimeError(f"{manifest_path} is not a finished build of fingerprint {fingerprint}; remove it")
        wheel = cached_wheel(local_dir, manifest)
        for command in stage_commands(staging, manifest):
            if not _run(host, command)[0]:
                raise RuntimeError(f"cannot create {staging} on {host.name}")
        if not host.put_file(str(wheel), f"{staging}/{manifest['wheel']}", **_as_root(host)):
            raise RuntimeError(f"could not upload {manifest['wheel']} to {host.name}")
        for command in check_staged_commands(staging, manifest):
            if not _run(host, command)[0]:
                raise RuntimeError(f"{manifest['wheel']} arrived corrupted on {host.name}")
        return True

    yield FunctionCommand(push, (), {})


def installed_torch_problems(ok: bool, stdout: str, stderr: str, cuda_version: str, archs: list[str]) -> list[str]:
    """What is wrong with the torch that facts.TORCH_PROBE just imported on a host (its exit status and output),
    judged by the rule the torch stage applies to any installed torch (decide.torch_problems)."""
    try:
        info = parse_torch_info(stdout) if ok else None
    except (ValueError, IndexError):
        return [f"torch's probe printed no torch information: {stdout.strip()[-500:]!r}"]
    if info is None:
        return [f"the installed torch does not import: {(stderr or stdout).strip()[-500:]}"]
    return torch_problems(info, cuda_version, archs)


@operation(is_idempotent=False)
def check_torch(python: str, cuda_version: str, archs: list[str], context: str):
    """Import the venv's torch on the host and check it as the torch stage checks an installed one (its CUDA
    version, code for each GPU architecture), then record the validated state (facts.TorchInfo reads it). Never a
    no-op: planned only right after torch was installed."""

    def check(state, host) -> bool:
        ok, output = host.run_shell_command(f"{shlex.quote(python)} -c {shlex.quote(TORCH_PROBE)}", **_as_root(host))
        problems = installed_torch_problems(ok, output.stdout, output.stderr, cuda_version, archs)
        for problem in problems:
            host.log_styled(f"torch check failed: {problem}", fg="red", log_func=logger.error)
        return not problems

    yield FunctionCommand(check, (), {})
    yield record_torch_state_command(python, context)


def _requirement(spec: str) -> tuple[str, str | None]:
    name, _, version = spec.partition("==")
    return canonicalize_name(name), version or None


@operation()
def pip_packages(python: str, packages: list[str], extra_args: str = "", reinstall: bool = False):
    """Install packages with `python -m pip`; a no-op when each is present (at the pinned version, if given), unless
    reinstall (the caller found an installed one broken).

    pyinfra's pip.packages needs a pip script, which some venvs (e.g. images built with ensurepip only) lack.
    """
    installed = fact(host, InstalledDistributions, python=python) or {}
    missing = [spec for spec in packages if reinstall or _requirement(spec)[0] not in installed
               or (_requirement(spec)[1] is not None and installed[_requirement(spec)[0]] != _requirement(spec)[1])]
    if not missing:
        host.noop(f"{', '.join(packages)} already installed")
        return
    yield f"{shlex.quote(python)} -m pip install {extra_args} {shlex.join(missing)}".replace("  ", " ")


def published_manifest(local_dir: str, fingerprint: str) -> dict | None:
    """What this machine knows of the wheel of `fingerprint` on the cache host's index (PUBLISHED in the wheel
    cache, written after an upload was checked): the builder's manifest with the index's file name; None when none."""
    path = Path(local_dir) / PUBLISHED
    if not path.is_file():
        return None
    return parse_manifest(path.read_text(), fingerprint, str(path))


# In wheel_cache_dir/<fingerprint>/ on this machine: the manifest of the wheel on the cache host's index (no wheel).
PUBLISHED = "published.json"


def _index_sha256(host, index_url: str, wheel: str) -> str | None:
    ok, page = _run(host, f"curl -fsS {shlex.quote(index_url + '/+simple/xformers/')}")
    return index_files(page).get(wheel) if ok else None


@operation(is_idempotent=False)
def publish_built_wheel(remote_dir: str, staging: str, local_dir: str, fingerprint: str, user: str, index_url: str,
                        password_file: str, remove_password: bool = False):
    """On the builder: stage its wheel in root's directory (read as the build user, sha256 checked against the
    manifest), upload it to the cache host's private index unless a file with that name and sha256 is there, check
    the index then serves exactly that, and record the manifest (not the wheel) in this machine's wheel cache.

    Planned only on the builder, and only while this machine has no record that the index holds the wheel (see
    deploys/xformers.py); a run killed between build and upload is repaired by the next, which finds the build
    finished and the wheel missing from the index. The upload user's password stays in root's file on the host;
    with remove_password (a copy share_upload_password made) that file is removed after the upload, uploaded or not.
    """

    def publish(state, host) -> bool:
        try:
            return _publish(host)
        finally:
            if remove_password:
                _run(host, f"rm -f -- {shlex.quote(password_file)}")

    def _publish(host) -> bool:
        manifest = _finished_build(host, remote_dir, fingerprint, user)
        published = dict(manifest, wheel=index_wheel_name(manifest["wheel"], fingerprint), built_as=manifest["wheel"])
        for command in [*stage_commands(staging, published, f"{remote_dir}/{manifest['wheel']}", user),
                        *check_staged_commands(staging, published)]:
            if not _run(host, command)[0]:
                raise RuntimeError(f"{manifest['wheel']} on {host.name} does not match "
                                   f"{host.name}:{remote_dir}/manifest.json's sha256")
        wheel, sha = published["wheel"], published["wheel_sha256"]
        on_index = _index_sha256(host, index_url, wheel)
        if on_index not in (None, sha):
            raise RuntimeError(f"{index_url} already holds {wheel} with sha256 {on_index}, not this build's {sha}; "
                               f"remove it from the cache host's index, then run again")
        if on_index is None:
            ok, upload = host.run_shell_command(
                upload_command(index_url, password_file, f"{staging}/{wheel}", json.dumps(manifest, sort_keys=True)),
                **_as_root(host))
            if not ok:
                raise RuntimeError(f"{host.name} could not upload {wheel} to {index_url}: "
                                   f"{(upload.stderr or upload.stdout).strip()[-300:]}")
            if _index_sha256(host, index_url, wheel) != sha:
                raise RuntimeError(f"{index_url} does not serve {wheel} with sha256 {sha} after its upload")
        local = Path(local_dir)
        local.mkdir(parents=True, exist_ok=True)
        (local / PUBLISHED).write_text(json.dumps(published, indent=2) + "\n")
        return True

    yield FunctionCommand(publish, (), {})


@operation(is_idempotent=False)
def stage_wheel_from_index(local_dir: str, staging: str, fingerprint: str, index_url: str):
    """On a host that installs the wheel another host built: root downloads it from the cache host's index into its
    staging directory and checks its sha256 there against the builder's manifest (PUBLISHED, written by
    publish_built_wheel earlier in the run or in an earlier one). Only planned for such hosts."""

    def stage(state, host) -> bool:
        published = published_manifest(local_dir, fingerprint)
        if published is None:
            raise RuntimeError(
                f"the xformers wheel {fingerprint} is not on the cache host's index: the builder failed earlier in "
                "this run; fix it (see its build.log) or set xformers_builder to another host, then run again")
        url = wheel_file_url(index_url, published["wheel"], published["wheel_sha256"])
        target = shlex.quote(f"{staging}/{published['wheel']}")
        for command in [*stage_commands(staging, published),
                        f"curl -fsS --retry 3 -o {target} {shlex.quote(url)}",
                        *check_staged_commands(staging, published)]:
            ok, output = host.run_shell_command(command, **_as_root(host))
            if not ok:
                raise RuntimeError(f"{host.name} could not stage {published['wheel']} from {url} with sha256 "
                                   f"{published['wheel_sha256']}: {(output.stderr or output.stdout).strip()[-300:]}")
        return True

    yield FunctionCommand(stage, (), {})


_PASSWORD = re.compile(r"[A-Za-z0-9+/=]{16,256}")


@operation(is_idempotent=False)
def share_upload_password(cache_host_name: str, source: str, dest: str):
    """Copy the index's upload password from the cache host's root-only file to root's own directory on this host
    (a builder that is not the cache host), mode 600 in a 700 directory. It passes through no command line and no
    file another user can read: with sudo, pyinfra's upload goes through a folder only the SSH user can enter.
    Only planned on such a builder before its upload; publish_built_wheel removes the copy again."""

    def share(state, host) -> bool:
        cache_host = state.inventory.get_host(cache_host_name, None)
        if cache_host is None or cache_host not in state.activated_hosts:
            raise RuntimeError(f"{host.name} builds the xformers wheel for the cache host {cache_host_name}, which is "
                               "not part of this run; run without --limit, or with the cache host in it")
        ok, output = cache_host.run_shell_command(f"cat -- {shlex.quote(source)}", **_as_root(cache_host))
        password = output.stdout.strip() if ok else ""
        if not _PASSWORD.fullmatch(password):
            raise RuntimeError(f"{cache_host_name}: {source} holds no upload password; run deploys/cache.py")
        folder = shlex.quote(dest.rsplit("/", 1)[0])
        if not _run(host, f"umask 077 && mkdir -p {folder} && chown root:root {folder} && chmod 700 {folder}")[0]:
            raise RuntimeError(f"cannot create {folder} on {host.name}")
        arguments = _as_root(host)
        scratch = None
        if arguments:
            # sudo: pyinfra uploads as the SSH user first; into a folder of that user's alone (mktemp -d: 700).
            ok, made = host.run_shell_command("mktemp -d")
            scratch = made.stdout.strip()
            if not ok or not re.fullmatch(r"/[A-Za-z0-9_./-]+", scratch):
                raise RuntimeError(f"mktemp -d failed on {host.name}")
            arguments["remote_temp_filename"] = f"{scratch}/upload"
        try:
            if not host.put_file(StringIO(password + "\n"), dest, **arguments):
                raise RuntimeError(f"could not copy the upload password to {host.name}")
        finally:
            if scratch:
                host.run_shell_command(f"rm -rf -- {shlex.quote(scratch)}")
        return _run(host, f"chown root:root {shlex.quote(dest)} && chmod 600 {shlex.quote(dest)}")[0]

    yield FunctionCommand(share, (), {})
