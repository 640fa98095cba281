"""Stage 2, cuda: the CUDA toolkit (cuda-toolkit-X-Y only: never `cuda`, `cuda-X-Y` or `cuda-drivers`).

Runs alone (after preflight): pyinfra inventory.py deploys/cuda.py
"""

import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import apt, server

from deploys.preflight import preflight
from gpufleet import facts
from gpufleet.decide import cuda_repo_dir
from gpufleet.fact_memo import fact
from gpufleet.layout import cuda_home
from gpufleet.nvidia_repo import ensure_repo, pin_driver_source
from gpufleet.operations import put_file
from gpufleet.stage import profile, refuse_host, run_alone, settings


@deploy("CUDA toolkit")
def cuda() -> None:
    config = settings()
    me = profile()
    version = config["cuda_version"]
    home = cuda_home(config)
    # A driver too old for the toolkit (Windows' on WSL, an accepted existing one) is refused by preflight.
    found = fact(host, facts.NvccVersion, cuda_home=home)
    if config["cuda_existing_home"]:
        if found != version:
            refuse_host(
                [
                    f"setting cuda_existing_home is {home} but its nvcc reports "
                    f"{found or 'nothing (no bin/nvcc)'}, not cuda_version {version}; fix one of the two settings."
                ]
            )
            return
    else:
        if found is not None and found != version:
            refuse_host([f"{home}/bin/nvcc reports {found}, not {version}; remove the foreign toolkit at {home}."])
            return
        if config["driver_source"] == "ubuntu" and not me.is_wsl:
            pin_driver_source(config)
        ensure_repo(config, cuda_repo_dir(me.os, me.is_wsl))
        package = "cuda-toolkit-" + version.replace(".", "-")
        install = apt.packages(name=f"Install the CUDA {version} toolkit ({package})", packages=[package])
        server.shell(
            name=f"Check that nvcc reports CUDA {version}",
            commands=[
                f"{shlex.quote(home + '/bin/nvcc')} --version | grep -q {shlex.quote(f'release {version},')} || "
                f"{{ echo {shlex.quote(f'{package} installed but {home}/bin/nvcc does not report release {version}')}"
                " >&2; exit 1; }"
            ],
            _if=install.did_change,
        )

    put_file(
        name=f"Put CUDA {version} on PATH for login shells",
        src=StringIO(
            "# gpufleet: the CUDA toolkit the venv's torch and xformers are built for.\n"
            f"export CUDA_HOME={shlex.quote(home)}\n"
            'export PATH="$CUDA_HOME/bin:$PATH"\n'
            'export LD_LIBRARY_PATH="$CUDA_HOME/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"\n'
        ),
        dest="/etc/profile.d/gpufleet-cuda.sh",
        mode="644",
    )


run_alone(__file__, preflight, cuda)
