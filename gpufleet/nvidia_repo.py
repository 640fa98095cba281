"""NVIDIA's CUDA apt repository, shared by the driver and CUDA stages: checked keyring, signed-by, one source."""

from __future__ import annotations

import shlex
from io import StringIO
from typing import Any
from urllib.parse import urlparse

from pyinfra import host
from pyinfra.facts.files import File
from pyinfra.operations import apt, files, server

from gpufleet.buildplan import ROOT_STATE_DIR
from gpufleet.facts import AptListsPresent, InterruptedPackageInstall
from gpufleet.operations import make_directory, put_file
from gpufleet.runstate import this_run

KEYRING = "/usr/share/keyrings/cuda-archive-keyring.gpg"
KEYRING_DEB = "cuda-keyring_1.1-1_all.deb"
SOURCE_NAME = "gpufleet-cuda"
DOWNLOADS = f"{ROOT_STATE_DIR}/downloads"


def _first_time(step: str) -> bool:
    """True the first time a step is asked for on the current host in this run: the driver and CUDA stages
    share these steps."""
    return this_run().first_time(step, host.name)


def keyring_command(deb: str, sha256: str) -> str:
    """Extract the keyring from the .deb only after its sha256 is checked, in the same command."""
    tmp = shlex.quote(f"{KEYRING}.tmp")
    return (f"echo {shlex.quote(f'{sha256}  {deb}')} | sha256sum -c --quiet && "
            f"dpkg-deb --fsys-tarfile {shlex.quote(deb)} | tar -xO {shlex.quote('.' + KEYRING)} > {tmp} "
            f"&& test -s {tmp} && chmod 644 {tmp} && mv {tmp} {shlex.quote(KEYRING)}")


def repo_url(config: dict[str, Any], repo_dir: str) -> str:
    return f"{config['cuda_repo_url'].rstrip('/')}/{repo_dir}/x86_64/"


def apt_settings(config: dict[str, Any]) -> None:
    """apt waits for a lock held by another process (bounded by apt_lock_timeout), and dpkg work a dropped
    connection interrupted is finished first. Planned once per host and run."""
    if not _first_time("apt settings"):
        return
    put_file(
        name="Make apt wait for package locks held by other processes",
        src=StringIO(f'DPkg::Lock::Timeout "{config["apt_lock_timeout"]}";\n'),
        dest="/etc/apt/apt.conf.d/50gpufleet-lock-timeout",
        mode="644",
    )
    repair_interrupted_packages()


def repair_interrupted_packages() -> None:
    """Finish dpkg work a dropped connection interrupted, decided from `dpkg --audit` and dpkg's journal.

    Planned once per host and run, on every host (deploys/full.py), so a broken dpkg never waits for a stage
    that happens to use apt; a no-op when dpkg is clean.
    """
    if not _first_time("dpkg repair"):
        return
    if host.get_fact(InterruptedPackageInstall):
        server.shell(
            name="Finish the package installation a dropped connection interrupted",
            commands=[
                "DEBIAN_FRONTEND=noninteractive dpkg --configure -a",
                "DEBIAN_FRONTEND=noninteractive apt-get -y -f install",
            ],
        )


def ensure_repo(config: dict[str, Any], repo_dir: str) -> None:
    """Keyring from cuda-keyring (sha256 checked, only its .gpg used) and a deb822 source with signed-by.

    Planned once per host and run; a no-op when the package, the keyring and the source file are in place.
    """
    if not _first_time("repository"):
        return
    apt_settings(config)
    sha256 = config["cuda_keyring_sha256"][repo_dir]
    # Root's own directory, never work_dir: the build user owns that tree and could swap the file for a link.
    deb = f"{DOWNLOADS}/{KEYRING_DEB}"
    make_directory(name=f"Create root's download directory {DOWNLOADS}", path=DOWNLOADS, user="root",
                    group="root", mode="700")
    download = files.download(
        name=f"Download {repo_url(config, repo_dir) + KEYRING_DEB} (sha256 checked)",
        src=repo_url(config, repo_dir) + KEYRING_DEB,
        dest=deb,
        sha256sum=sha256,
    )
    keyring_missing = not host.get_fact(File, path=KEYRING)
    keyring = server.shell(
        name="Install NVIDIA's repository keyring",
        commands=[keyring_command(deb, sha256)],
        _if=lambda: keyring_missing or download.did_change(),
    )
    source = apt.sources_file(
        name="Add NVIDIA's CUDA repository",
        filename=SOURCE_NAME,
        uris=repo_url(config, repo_dir),
        suites="/",
        signed_by=KEYRING,
    )
    # From the host's state: a run killed after writing the source but before `apt update` left no lists.
    lists_missing = not host.get_fact(AptListsPresent, uri=repo_url(config, repo_dir))
    apt.update(
        name="Update apt lists for NVIDIA's repository",
        _if=lambda: lists_missing or keyring.did_change() or source.did_change(),
    )


def pin_driver_source(config: dict[str, Any]) -> None:
    """With Ubuntu's driver, apt never takes driver packages from NVIDIA's repository: sources never mix.

    Planned once per host and run, before anything can add NVIDIA's repository; a no-op when the pin is in place.
    """
    if not _first_time("driver source pin"):
        return
    origin = urlparse(config["cuda_repo_url"]).hostname
    put_file(
        name=f"Never take driver packages from NVIDIA's repository ({origin}) on an Ubuntu-driver host",
        src=StringIO(
            "# gpufleet: driver_source is ubuntu; NVIDIA's repository serves the toolkit only.\n"
            f"Package: nvidia-* libnvidia-* xserver-xorg-video-nvidia-*\nPin: origin {origin}\nPin-Priority: -1\n"
        ),
        dest="/etc/apt/preferences.d/gpufleet-driver-source",
        mode="644",
    )
