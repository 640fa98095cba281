"""What the lab fetches from the outside once and keeps in the cache: Debian packages, wheels, the xformers sdist.

Each download lands under CACHE_DIR keyed by what was asked for, and is marked complete only after it succeeded,
so an interrupted prepare is simply redone.
"""

import hashlib
import json
import os
import shutil
import ssl
import urllib.request
from pathlib import Path

from gpufleet_lab.os_packages import OS_PACKAGES
from gpufleet_lab.paths import (
    CACHE_DIR,
    DEBIAN_MIRROR,
    DEBIAN_SECURITY_MIRROR,
    DEBIAN_SUITE,
)
from gpufleet_lab.system import LabError, run

PIP_PACKAGES: tuple[str, ...] = ("pip", "setuptools", "wheel", "ninja")
# The fleet cache's Python index server (deploys/cache.py), for the lab hosts' Python 3.11.
CACHE_SERVER_PACKAGES: tuple[str, ...] = ("devpi-server",)
LAB_HOST_PYTHON = "3.11"
XFORMERS_VERSION = "0.0.35"
XFORMERS_SHA256 = "f7fc183a58e4bf0e2ae339a18fb1b1d4a37854c0f2545b4f360fef001646ab76"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _finish(staging: Path, target: Path) -> Path:
    (staging / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _staging(target: Path) -> Path:
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def os_packages() -> Path:
    """Download OS_PACKAGES with all dependencies and recommends, resolved as for an empty Debian 12 host."""
    sources = "".join(f"deb [signed-by={DEBIAN_KEYRING}] {url} {suite} main\n" for url, suite in (
        (DEBIAN_MIRROR, DEBIAN_SUITE), (DEBIAN_MIRROR, f"{DEBIAN_SUITE}-updates"),
        (DEBIAN_SECURITY_MIRROR, f"{DEBIAN_SUITE}-security")))
    target = CACHE_DIR / f"debian-{_key(OS_PACKAGES, sources)}"
    if (target / ".complete").exists():
        return target
    staging = _staging(target)
    apt_dir = staging / ".apt"
    for sub in ("lists/partial", "cache", "parts", "prefs", "archives/partial"):
        (apt_dir / sub).mkdir(parents=True)
    (apt_dir / "sources.list").write_text(sources)
    (apt_dir / "status").touch()
    options = [f"-oDir::Etc::SourceList={apt_dir / 'sources.list'}", f"-oDir::Etc::SourceParts={apt_dir / 'parts'}",
               f"-oDir::Etc::PreferencesParts={apt_dir / 'prefs'}", f"-oDir::Etc::Preferences={apt_dir / 'prefs/none'}",
               f"-oDir::State::Lists={apt_dir / 'lists'}", f"-oDir::State::status={apt_dir / 'status'}",
               f"-oDir::Cache={apt_dir / 'cache'}", f"-oDir::Cache::archives={apt_dir / 'archives'}",
               "-oAPT::Architectures=amd64", "-oDebug::NoLocking=1"]
    run(["apt-get", *options, "update"])
    run(["apt-get", *options, "install", "--download-only", "-y", *OS_PACKAGES])
    for deb in (apt_dir / "archives").glob("*.deb"):
        deb.rename(staging / deb.name)
    shutil.rmtree(apt_dir)
    return _finish(staging, target)


def wheels() -> Path:
    target = CACHE_DIR / f"wheels-{_key(PIP_PACKAGES + ('with-dependencies',))}"
    if (target / ".complete").exists():
        return target
    staging = _staging(target)
    # With their dependencies (wheel needs packaging), as a host resolves them from the lab index.
    run(["python3", "-m", "pip", "download", "--only-binary", ":all:", "-d", str(staging), *PIP_PACKAGES])
    return _finish(staging, target)


def cache_server_wheels() -> Path:
    """devpi-server and its dependencies as wheels for the lab hosts' Python (which may differ from this one)."""
    target = CACHE_DIR / f"wheels-{_key(CACHE_SERVER_PACKAGES + (LAB_HOST_PYTHON, 'manylinux'))}"
    if (target / ".complete").exists():
        return target
    staging = _staging(target)
    platforms = [arg for tag in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
                 for arg in ("--platform", tag)]
    run(["python3", "-m", "pip", "download", "--only-binary", ":all:", "--python-version", LAB_HOST_PYTHON,
         "--implementation", "cp", *platforms, "-d", str(staging), *CACHE_SERVER_PACKAGES])
    return _finish(staging, target)


def xformers_sdist() -> Path:
    """The real xformers sdist from PyPI, checked against its pinned sha256.

    `pip download --no-binary :all:` cannot fetch it: pip prepares the sdist's metadata, which imports torch.
    So the file is found through PyPI's JSON simple API and fetched with the same CA bundle pip uses.
    """
    name = f"xformers-{XFORMERS_VERSION}.tar.gz"
    target = CACHE_DIR / "sdist" / name
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == XFORMERS_SHA256:
        return target
    cafile = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    context = ssl.create_default_context(cafile=cafile)
    request = urllib.request.Request("https://pypi.org/simple/xformers/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, context=context, timeout=60) as response:
        listing = json.load(response)
    url = next((f["url"] for f in listing["files"] if f["filename"] == name), None)
    if url is None:
        raise LabError(f"PyPI lists no {name}; cannot build the lab's xformers mirror")
    with urllib.request.urlopen(url, context=context, timeout=300) as response:
        data = response.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != XFORMERS_SHA256:
        raise LabError(f"{name} from {url} has sha256 {digest}, expected {XFORMERS_SHA256}; not caching it")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.rename(target)
    return target
