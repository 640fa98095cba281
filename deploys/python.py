"""Stage 3, python: a venv of python_version owned by the unprivileged build user, with pip, wheel, setuptools, ninja.

Runs alone (after preflight): pyinfra inventory.py deploys/python.py
"""

import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import Directory
from pyinfra.operations import apt, files, server

from deploys.preflight import preflight
from gpufleet import facts
from gpufleet.decide import VENV_TOOLS, pip_conf
from gpufleet.fact_memo import fact
from gpufleet.nvidia_repo import apt_settings
from gpufleet.operations import make_directory, pip_packages, put_file
from gpufleet.stage import as_user, path_owner, refuse_host, run_alone, settings, venv_owner


def foreign_directories(config: dict) -> list[str]:
    """work_dir and (unless adopted) venv_path are handed to build_user: never a directory someone else owns.

    Absent, or owned by build_user (gpufleet made it) or by root (an earlier gpufleet's stage made it first), is fine.
    """
    user = config["build_user"]
    keys = ("work_dir",) if config["venv_adopt"] else ("work_dir", "venv_path")
    problems = []
    for key in keys:
        owner = path_owner(config[key])
        if owner not in (None, user, "root"):
            problems.append(f"setting {key} is {config[key]}, which exists and belongs to {owner}; gpufleet hands "
                            f"only a directory of its own to {user}: choose a new path")
    return problems


@deploy("Python venv")
def python() -> None:
    config = settings()
    venv = config["venv_path"]
    user = config["build_user"]
    interpreter = config["python_interpreter"] or "/usr/bin/python3"
    venv_python = f"{venv}/bin/python"

    if config["venv_adopt"]:
        found = fact(host, facts.PythonVersion, python=venv_python)
        if found != config["python_version"]:
            refuse_host(
                [
                    f"setting venv_adopt is true but {venv_python} is "
                    f"{'missing' if found is None else 'Python ' + found}, not python_version "
                    f"{config['python_version']}; point venv_path at the venv or fix python_version."
                ]
            )
            return
    else:
        found = fact(host, facts.PythonVersion, python=interpreter)
        if found != config["python_version"]:
            refuse_host(
                [
                    f"{interpreter} is {'missing' if found is None else 'Python ' + found}, not python_version "
                    f"{config['python_version']}; set python_interpreter to a Python {config['python_version']} "
                    "or change python_version."
                ]
            )
            return

    taken = foreign_directories(config)
    if taken:
        refuse_host(taken)
        return

    account = fact(host, facts.Account, user=user)
    build_user_exists = account is not None and (account["home"], account["shell"]) == (config["work_dir"], "/bin/bash")
    # Planned only while missing or different: pyinfra's check of a user reads every user of the host (seconds).
    if not build_user_exists:
        _create_build_user(user, config["work_dir"])
    make_directory(name=f"Create {config['work_dir']}", path=config["work_dir"], user=user, group=user, mode="755")
    owner = venv_owner(config)
    if not config["venv_adopt"]:
        if "python3-venv" not in host.get_fact(DebPackages):
            apt_settings(config)
            # Planned only while missing, so the list refresh never makes a re-run report a change.
            apt.packages(name="Install Python's venv module", packages=["python3-venv"], update=True, cache_time=3600)
        parent = venv.rsplit("/", 1)[0] or "/"
        # Only a parent gpufleet creates gets a mode: an existing one (/opt, /srv, someone's home) is left as it is.
        if host.get_fact(Directory, path=parent) is None:
            make_directory(name=f"Create {parent}", path=parent, mode="755")
        make_directory(name=f"Create {venv} for {user}", path=venv, user=user, group=user, mode="755")
        # "no-pip": a creation killed before ensurepip finished; --clear makes it from scratch.
        venv_state = fact(host, facts.VenvState, python=venv_python)
        if venv_state != "ok":
            server.shell(
                name=f"Create the venv {venv}" + (" again (pip is missing)" if venv_state == "no-pip" else ""),
                commands=[shlex.join([interpreter, "-m", "venv", "--clear", venv])],
                **as_user(user),
            )
    conf = pip_conf(config)
    if conf:
        put_file(
            name="Point the venv's pip at the configured index",
            src=StringIO(conf),
            dest=f"{venv}/pip.conf",
            user=owner,
            mode="644",
        )
    else:
        files.file(name="Use PyPI in the venv (no mirror set)", path=f"{venv}/pip.conf", present=False)
    pip_packages(
        name=f"Install {', '.join(VENV_TOOLS)} in the venv",
        packages=VENV_TOOLS,
        python=venv_python,
        **as_user(owner),
    )


def _create_build_user(user: str, home: str) -> None:
    server.user(
        name=f"Create the unprivileged build user {user}",
        user=user,
        home=home,
        shell="/bin/bash",
        system=True,
        create_home=False,
    )


run_alone(__file__, preflight, python)
