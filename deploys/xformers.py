"""Stage 5, xformers: built from the sdist with our patch series, once per fleet, installed everywhere.

For each wheel fingerprint (xformers source, patches, torch, CUDA, Python, arch list) one host builds: the
configured xformers_builder, else the first host that needs it. The wheel comes back to this machine's cache
(wheel_cache_dir) and goes from there to every other host, which only installs it. A host whose installed
xformers carries the same fingerprint does nothing.

With a fleet cache (inventory group `cache`) the wheel never passes through this machine: the builder (by default
the cache host, when it is a workstation of the fleet) uploads it to the cache host's private devpi index
(cache.WHEEL_INDEX), and every other host downloads it from there, sha256 checked against the builder's manifest,
of which this machine keeps a copy (operations.PUBLISHED) but no wheel.
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
from gpufleet import cache as cache_module
from gpufleet.cache import wheel_index_url
from gpufleet.fact_memo import fact
from gpufleet.operations import (
    fetch_built_wheel,
    make_directory,
    publish_built_wheel,
    published_manifest,
    push_built_wheel,
    put_file,
    share_upload_password,
    stage_wheel_from_index,
)
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
from gpufleet.xformers_fleet import builder_for, cache_host, fleet_wheels, host_wheel, patch_dir


@deploy("xformers")
def xformers() -> None:
    config = settings()
    mine = host_wheel(host)
    cache_address = host.data.get("gpufleet_cache_address")
    if not mine.needs_install and not cache_address:
        return
    fp = mine.fingerprint
    layout = host_layout(config["work_dir"], config["xformers_version"], fp)
    cache = local_cache(config, fp)
    lock_control_folder(cache.parent)
    if cache_address:
        _through_cache_host(config, mine, layout, cache, cache_address)
        return
    cached = (cache / "manifest.json").is_file()
    builder = None if cached else builder_for(fp, fleet_wheels(), config["xformers_builder"])
    is_builder = builder == host.name
    usable, finished = _ready_to_build(config, layout, fp, is_builder)
    if not usable:
        return
    python = f"{config['venv_path']}/bin/python"

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
        user=config["build_user"],
        _if=lambda: is_builder,
    )
    push_built_wheel(
        name=f"Upload the xformers wheel built {'earlier' if cached else 'by ' + str(builder)}",
        local_dir=str(cache),
        staging=layout.staging,
        fingerprint=fp,
        _if=lambda: not is_builder,
    )
    _install(config, mine, layout)


def _through_cache_host(config: dict, mine, layout, cache: Path, cache_address: str) -> None:
    """With a fleet cache: the builder uploads the wheel to the cache host's private index, every other host
    downloads it from there; this machine keeps only the manifest (no wheel byte passes through it).

    Decided from state: the build is needed unless this machine's record of the upload (PUBLISHED) names a file
    the index serves with that sha256; a run killed between build and upload finds the build finished and uploads.
    """
    fp = mine.fingerprint
    index_url = wheel_index_url(cache_address, config)
    server_host = cache_host()
    published = published_manifest(str(cache), fp)
    on_index = published is not None and (
        server_host is None
        or fact(server_host, facts.DevpiIndexFiles, index_url=index_url).get(published["wheel"])
        == published["wheel_sha256"])
    preferred = server_host.name if server_host else None
    builder = None if on_index else builder_for(fp, fleet_wheels(), config["xformers_builder"], preferred)
    is_builder = builder == host.name
    if not mine.needs_install and not is_builder:
        return
    usable, finished = _ready_to_build(config, layout, fp, is_builder)
    if not usable:
        return
    python = f"{config['venv_path']}/bin/python"
    if is_builder:
        # curl uploads the wheel.
        _prepare_build(config, layout, python, extra_tools=("curl",))
    elif host.get_fact(facts.MissingTools, tools=("curl",)):
        apt_settings(config)
        apt.packages(name="Install curl (downloads the wheel from the cache host)", packages=["curl"], update=True,
                     cache_time=3600)
    _build(config, mine, layout, python, run=is_builder, finished=finished)
    remote = is_builder and server_host is not None and server_host.name != host.name
    password = cache_module.BUILDER_UPLOAD_PASSWORD if remote else cache_module.UPLOAD_PASSWORD
    share_upload_password(
        name=f"Copy the cache index's upload password from {preferred} (root only)",
        cache_host_name=str(preferred),
        source=cache_module.UPLOAD_PASSWORD,
        dest=cache_module.BUILDER_UPLOAD_PASSWORD,
        _if=lambda: remote,
    )
    publish_built_wheel(
        name=f"Upload the built wheel to the cache host's index {cache_module.WHEEL_INDEX}",
        remote_dir=layout.out_dir,
        staging=layout.staging,
        local_dir=str(cache),
        fingerprint=fp,
        user=config["build_user"],
        index_url=index_url,
        password_file=password,
        remove_password=remote,
        _if=lambda: is_builder,
    )
    stage_wheel_from_index(
        name=f"Download the xformers wheel built {'earlier' if on_index else 'by ' + str(builder)} "
             f"from the cache host (sha256 checked)",
        local_dir=str(cache),
        staging=layout.staging,
        fingerprint=fp,
        index_url=index_url,
        _if=lambda: mine.needs_install and not is_builder,
    )
    if mine.needs_install:
        _install(config, mine, layout)


def _ready_to_build(config: dict, layout, fp: str, is_builder: bool) -> tuple[bool, str | None]:
    """The work directory and the cubin reader every installing host uses; (usable, on the builder the wheel of a
    finished build of fp). Not usable when the host was refused: a planted link, or on the builder a manifest no
    build writes."""
    if refuse_planted_links(*build_paths(layout, config["work_dir"])):
        return False, None
    usable, finished = _finished(config, layout, fp) if is_builder else (True, None)
    if not usable:
        return False, None
    user = config["build_user"]
    work = f"{config['work_dir']}/xformers"
    make_directory(name=f"Create {work}", path=work, user=user, group=user, mode="755")
    _upload(CUBIN_READER, layout.cubins_reader, user)
    return True, finished


def _install(config: dict, mine, layout) -> None:
    """Install the wheel staged in root's directory, prove its sm code, and record it in root's stamp."""
    fp = mine.fingerprint
    python = f"{config['venv_path']}/bin/python"
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


def _prepare_build(config: dict, layout, python: str, extra_tools: tuple[str, ...] = ()) -> None:
    """On the builder: the tools, the sdist (sha256 checked), the patch series and the build script."""
    user = config["build_user"]
    has_headers = host.get_fact(facts.PythonHeaders, python=python)
    tools = ("g++", "make", "patch") + (("ccache",) if config["xformers_ccache"] else ()) + extra_tools
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
