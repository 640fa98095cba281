"""Lab test deploy: a package from the lab's Debian mirror, the STAND-IN `cuda-toolkit-12-8` from the lab's
NVIDIA-like repository behind a signed-by keyring, and a written file. It proves convergence and idempotence
of the lab itself; the real stages live in deploys/."""

from io import StringIO

from pyinfra import host
from pyinfra.operations import apt, files

repo = f"{host.data.cuda_repo_url}/debian12/x86_64"
download_dir = "/var/cache/gpufleet-lab-test"
keyring_deb = f"{download_dir}/cuda-keyring_1.1-1_all.deb"

files.directory(name="Create the download directory", path=download_dir)
files.download(
    name="Download the CUDA keyring package (lab stand-in)",
    src=f"{repo}/cuda-keyring_1.1-1_all.deb",
    dest=keyring_deb,
    sha256sum=host.data.cuda_keyring_sha256["debian12"],
)
apt.deb(name="Install the CUDA keyring", src=keyring_deb)
# The keyring package lists NVIDIA's own URL, which a mirrored (or lab) host cannot reach.
files.file(name="Remove the keyring's NVIDIA source list", path="/etc/apt/sources.list.d/cuda-debian12-x86_64.list",
           present=False)
cuda_repo = apt.repo(
    name="Add the CUDA repository (lab mirror)",
    src=f"deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] {repo}/ /",
    filename="cuda-lab",
)
apt.update(name="Refresh package lists after adding the CUDA repository", _if=cuda_repo.did_change)
apt.packages(
    name="Install tree (Debian mirror) and the CUDA 12.8 toolkit (stand-in)",
    packages=["tree", "cuda-toolkit-12-8"],
    no_recommends=True,
)
files.put(
    name="Write the lab marker file",
    src=StringIO(f"converged by the gpufleet lab test deploy on {host.name}\n"),
    dest="/etc/gpufleet-lab-test.conf",
)
