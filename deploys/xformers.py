"""Stage 5, xformers: built from the sdist with our patch series, once per fleet, installed everywhere.

For each wheel fingerprint (xformers source, patches, torch, CUDA, Python, arch list) one host builds: the
configured xformers_builder, else the first host that needs it. The wheel comes back to this machine's cache
(wheel_cache_dir) and goes from there to every other host, which only installs it. A host whose installed
xformers carries the same fingerprint does nothing.
Runs alone (after preflight): pyinfra inventory.py deploys/xformers.py
"""

import shlex
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt, files, server

from deploys.preflight import preflight
from gpufleet import facts
from gpufleet.buildplan import (
    BUILD_SCRIPT,
    CUBIN_READER,
    ManifestError,
    WheelBuild,
    build_paths,
    build_shell_command,
    finished_wheel,
    host_layout,
    install_commands,
    max_jobs,
)
from gpufleet.layout import cuda_home, local_cache
from gpufleet.nvidia_repo import apt_settings
from gpufleet.operations import fetch_built_wheel, make_directory, push_built_wheel, put_file
from gpufleet.settings import REPO_ROOT
from gpufleet.stage import (
    as_user,
    file_text,
    lock_control_folder,
    profile,
    record_stack_change,
    refuse_host,
    refuse_planted_links,
    run_alone,
    settings,
    venv_owner,
)
from gpufleet.xformers_fleet import builder_for, fleet_wheels, host_wheel, patch_dir


@deploy("xformers")
def xformers() -> None:
    config = settings()
    mine = host_wheel(host)
    if not mine.needs_install:
        return
    fp = mine.fingerprint
    layout = host_layout(config["work_dir"], config["xformers_version"], fp)
    work = f"{config['work_dir']}/xformers"
    user = config["build_user"]
    python = f"{config['venv_path']}/bin/python"
    cache = local_cache(config, fp)
    lock_control_folder(cache.parent)
    cached = (cache / "manifest.json").is_file()
    builder = None if cached else builder_for(fp, fleet_wheels(), config["xformers_builder"])
    if refuse_planted_links(*build_paths(layout, config["work_dir"])):
        return
    is_builder = builder == host.name
    usable, finished = _finished(config, layout, fp) if is_builder else (True, None)
    if not usable:
        return
    make_directory(name=f"Create {work}", path=work, user=user, group=user, mode="755")
    _upload(CUBIN_READER, layout.cubins_reader, user)

    # Every installing host plans the build, the fetch and the upload, gated to the hosts each concerns, so the
    # upload runs after the fetch (gpufleet/stage.py, the order of a run).
    if is_builder:
        _prepare_build(config, layout, python)
    _build(config, mine, layout, python, run=is_builder, finished=finished)
    fetch_built_wheel(
        name="Fetch the built wheel to this machine's cache",
        remote_dir=layout.out_dir,
        staging=layout.staging,
        local_dir=str(cache),
        fingerprint=fp,
        user=user,
        _if=lambda: is_builder,
    )
    push_built_wheel(
        name=f"Upload the xformers wheel built {'earlier' if cached else 'by ' + str(builder)}",
        local_dir=str(cache),
        staging=layout.staging,
        fingerprint=fp,
        _if=lambda: not is_builder,
    )

    owner = venv_owner(config)
    proof = f"{layout.out_dir}/installed-cubins.json"
    install = server.shell(
        name=f"Install xformers {config['xformers_version']} ({fp}) and prove its sm code",
        commands=[
            *install_commands(python, layout),
            f"mkdir -p {shlex.quote(layout.out_dir)} && {shlex.quote(python)} {shlex.quote(layout.cubins_reader)} "
            f"--require {shlex.quote(';'.join(mine.arch_list))} "
            f"\"$({shlex.quote(python)} -c 'import os, xformers; print(os.path.dirname(xformers.__file__))')/_C.so\" "
            f"> {shlex.quote(proof)}",
        ],
        **as_user(owner),
    )
    record_stack_change(install)
    # Root's stamp, outside the build user's reach: the build user cannot make a host skip or repeat an install.
    server.shell(
        name=f"Record that xformers {fp} is installed",
        commands=[f"printf '%s\\n' {shlex.quote(fp)} > {shlex.quote(layout.stamp)}"],
        _if=install.did_change,
    )


def _upload(local: str, remote: str, user: str) -> None:
    put_file(name=f"Upload {Path(remote).name}", src=str(REPO_ROOT / local), dest=remote, user=user, group=user, mode="755")


def _prepare_build(config: dict, layout, python: str) -> None:
    """On the builder: the tools, the sdist (sha256 checked), the patch series and the build script."""
    user = config["build_user"]
    has_headers = host.get_fact(facts.PythonHeaders, python=python)
    tools = ("g++", "make", "patch") + (("ccache",) if config["xformers_ccache"] else ())
    packages = sorted(host.get_fact(facts.MissingTools, tools=tools))
    if not has_headers:
        packages.append(f"python{config['python_version']}-dev")
    if packages:
        apt_settings(config)
        # Refresh stale or empty lists: with an accepted driver and an existing toolkit no earlier stage updates them.
        apt.packages(name=f"Install the build tools ({', '.join(packages)})", packages=packages, update=True,
                     cache_time=3600)
    files.download(
        name=f"Download {config['xformers_source_url']} (sha256 checked)",
        src=config["xformers_source_url"],
        dest=layout.sdist,
        sha256sum=config["xformers_source_sha256"],
        user=user,
        group=user,
    )
    files.sync(
        name="Upload the patch series",
        src=str(patch_dir(config)),
        dest=layout.patch_dir,
        user=user,
        group=user,
        delete=True,
    )
    _upload(BUILD_SCRIPT, layout.script, user)


def _finished(config: dict, layout, fp: str) -> tuple[bool, str | None]:
    """(usable, wheel name of a finished build of fp on this host); not usable when its manifest names something
    no build writes, and then the host is refused. Read as the build user: root never opens a file of that tree."""
    text = file_text(layout.manifest, **as_user(config["build_user"]))
    try:
        return True, finished_wheel(text, fp, layout.manifest)
    except ManifestError as error:
        refuse_host([str(error)])
        return False, None


def _build(config: dict, mine, layout, python: str, run: bool, finished: str | None) -> None:
    """The build as the build user, only on the builder and only without a finished manifest for the fingerprint."""
    me = profile()
    jobs = config["xformers_max_jobs"] or max_jobs(me.mem_available, me.cpus)
    build = WheelBuild(
        sdist=layout.sdist,
        sdist_sha256=config["xformers_source_sha256"],
        patch_dir=layout.patch_dir,
        arch_list=mine.arch_list,
        max_jobs=jobs,
        python=python,
        cuda_home=cuda_home(config),
        out_dir=layout.out_dir,
        fingerprint=mine.fingerprint,
        ccache=config["xformers_ccache"],
        cubins_reader=layout.cubins_reader,
    )
    server.shell(
        name=f"Build xformers for {', '.join(mine.arch_list)} with {jobs} jobs (log: {layout.log})",
        commands=[build_shell_command(layout.script, build)],
        **as_user(config["build_user"]),
        _if=lambda: run and finished is None,
    )


run_alone(__file__, preflight, xformers)
