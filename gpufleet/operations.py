"""gpufleet's own pyinfra operations. Each docstring says what makes it a no-op."""

from __future__ import annotations

import json
import posixpath
import shlex
from pathlib import Path

from packaging.utils import canonicalize_name
from pyinfra import host, logger
from pyinfra.api import FunctionCommand, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import Directory, File, Sha1File
from pyinfra.operations import files

from gpufleet.buildplan import parse_manifest, staged_checksum_line
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
        where = f"{host.name}:{remote_dir}/manifest.json"
        ok, output = _run(host, f"cat -- {shlex.quote(remote_dir + '/manifest.json')}", _su_user=user)
        if not ok:
            raise RuntimeError(f"{host.name} has no finished build in {remote_dir} (manifest.json missing)")
        manifest = parse_manifest(output, fingerprint, where)
        if manifest is None:
            raise RuntimeError(f"{where} is not a finished build of fingerprint {fingerprint}")
        wheel = cached_wheel(local_dir, manifest)
        for command in [*stage_commands(staging, manifest, f"{remote_dir}/{manifest['wheel']}", user),
                        *check_staged_commands(staging, manifest)]:
            ok, _ = _run(host, command)
            if not ok:
                raise RuntimeError(f"{manifest['wheel']} on {host.name} does not match {where}'s sha256")
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
