"""Lab test deploy for the fleet cache: deploys/cache.py, then every workstation installs Debian packages
through apt and wheels (pip's index and the torch index) through pip, and the
xformers sdist as the xformers stage downloads it, so the cache sees each file from every client.

Debian packages come from env CACHE_TEST_PACKAGES (default "patch", one of the xformers stage's build tools, so
the cache host fetches it ahead as it does for the real deploys), so a test can ask for another one later.
"""

import os
from io import StringIO

from pyinfra import host
from pyinfra.facts.files import File
from pyinfra.operations import apt, files, server

from deploys.cache import fleet_cache
from gpufleet.decide import pip_conf
from gpufleet.operations import pip_packages
from gpufleet.stage import cache_only, settings

VENV = "/opt/gpufleet-cache-test/venv"

fleet_cache()
if not cache_only():
    config = settings()
    apt.update(name="Refresh apt lists", cache_time=3600)
    apt.packages(name="Install the test packages", packages=os.environ.get("CACHE_TEST_PACKAGES", "patch").split(),
                 no_recommends=True)
    has_venv = host.get_fact(File, path=f"{VENV}/bin/python") is not None
    server.shell(name=f"Create {VENV}", commands=[f"python3 -m venv {VENV}"], _if=lambda: not has_venv)
    files.put(name="Point the venv's pip at the configured index", src=StringIO(pip_conf(config) or ""),
              dest=f"{VENV}/pip.conf")
    pip_packages(name="Install ninja and wheel through pip.conf", packages=["ninja", "wheel"],
                 python=f"{VENV}/bin/python", extra_args="--no-cache-dir")
    files.download(name="Download the xformers sdist (sha256 checked)", src=config["xformers_source_url"],
                   dest="/opt/gpufleet-cache-test/xformers.tar.gz", sha256sum=config["xformers_source_sha256"])
    files.download(name="Download the CUDA keyring package (sha256 checked)",
                   src=f"{config['cuda_repo_url']}/debian12/x86_64/cuda-keyring_1.1-1_all.deb",
                   dest="/opt/gpufleet-cache-test/cuda-keyring.deb", sha256sum=config["cuda_keyring_sha256"]["debian12"])
    cuda_repo = apt.repo(name="Add the CUDA repository", filename="gpufleet-cache-test-cuda",
                         src=f"deb [signed-by=/usr/share/keyrings/gpufleet-lab-archive.gpg] "
                             f"{config['cuda_repo_url']}/debian12/x86_64/ /")
    apt.update(name="Refresh apt lists for the CUDA repository", _if=cuda_repo.did_change)
    apt.packages(name="Install the CUDA toolkit (lab stand-in) from the CUDA repository",
                 packages=["cuda-toolkit-12-8"], no_recommends=True)
    pip_packages(name="Install torch from the torch index", packages=[f"torch=={config['torch_version']}"],
                 python=f"{VENV}/bin/python",
                 extra_args=f"--no-cache-dir --no-deps --index-url {config['torch_index_url']}")
