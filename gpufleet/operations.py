"""gpufleet's own pyinfra operations. Each docstring says what makes it a no-op."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from pyinfra import host
from pyinfra.api import FunctionCommand, operation

from gpufleet.facts import PipFreeze
from gpufleet.fingerprint import file_sha256


@operation(is_idempotent=False)
def refuse(reasons: list[str]):
    """Fail this host with the reasons on stderr. Never a no-op: it exists to stop the host."""
    text = "\n".join(f"gpufleet refuses this host: {r}" for r in reasons)
    yield f"echo {shlex.quote(text)} >&2; exit 1"


@operation(is_idempotent=False)
def fetch_built_wheel(remote_dir: str, local_dir: str):
    """Copy the builder's wheel and manifest to this machine's cache, checking the wheel's sha256.

    Only planned on the builder when its wheel is not cached yet; the manifest is written last, so a broken copy
    never looks finished.
    """

    def fetch(state, host) -> bool:
        ok, output = host.run_shell_command(f"cat {shlex.quote(remote_dir)}/manifest.json")
        if not ok:
            raise RuntimeError(f"{host.name} has no finished build in {remote_dir} (manifest.json missing)")
        manifest = json.loads(output.stdout)
        cache = Path(local_dir)
        cache.mkdir(parents=True, exist_ok=True)
        wheel = cache / manifest["wheel"]
        if not host.get_file(f"{remote_dir}/{manifest['wheel']}", str(wheel)):
            raise RuntimeError(f"could not fetch {manifest['wheel']} from {host.name}")
        if file_sha256(wheel) != manifest["wheel_sha256"]:
            wheel.unlink()
            raise RuntimeError(f"{manifest['wheel']} from {host.name} does not match its manifest's sha256")
        (cache / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return True

    yield FunctionCommand(fetch, (), {})


@operation(is_idempotent=False)
def push_built_wheel(local_dir: str, remote_dir: str, owner: str):
    """Upload the cached wheel and its manifest to a host that needs it (only planned for such hosts)."""

    def push(state, host) -> bool:
        manifest_path = Path(local_dir) / "manifest.json"
        if not manifest_path.is_file():
            raise RuntimeError(
                f"no built wheel in {local_dir}: the builder failed earlier in this run; fix it (see its build.log) "
                "or set xformers_builder to another host, then run again"
            )
        manifest = json.loads(manifest_path.read_text())
        quoted = shlex.quote(remote_dir)
        ok, _ = host.run_shell_command(f"mkdir -p {quoted} && chown {shlex.quote(owner)} {quoted}")
        if not ok:
            raise RuntimeError(f"cannot create {remote_dir} on {host.name}")
        if not host.put_file(str(Path(local_dir) / manifest["wheel"]), f"{remote_dir}/{manifest['wheel']}"):
            raise RuntimeError(f"could not upload {manifest['wheel']} to {host.name}")
        check = f"cd {quoted} && echo '{manifest['wheel_sha256']}  {manifest['wheel']}' | sha256sum -c --quiet"
        ok, _ = host.run_shell_command(check)
        if not ok:
            raise RuntimeError(f"{manifest['wheel']} arrived corrupted on {host.name}")
        return host.put_file(str(manifest_path), f"{remote_dir}/manifest.json")

    yield FunctionCommand(push, (), {})


def _requirement(spec: str) -> tuple[str, str | None]:
    name, _, version = spec.partition("==")
    return re.sub(r"[-_.]+", "-", name).lower(), version or None


@operation()
def pip_packages(python: str, packages: list[str], extra_args: str = "", reinstall: bool = False):
    """Install packages with `python -m pip`; a no-op when each is present (at the pinned version, if given), unless
    reinstall (the caller found an installed one broken).

    pyinfra's pip.packages needs a pip script, which some venvs (e.g. images built with ensurepip only) lack.
    """
    installed = host.get_fact(PipFreeze, python=python) or {}
    missing = [spec for spec in packages if reinstall or _requirement(spec)[0] not in installed
               or (_requirement(spec)[1] is not None and installed[_requirement(spec)[0]] != _requirement(spec)[1])]
    if not missing:
        host.noop(f"{', '.join(packages)} already installed")
        return
    yield f"{python} -m pip install {extra_args} {' '.join(shlex.quote(m) for m in missing)}".replace("  ", " ")
