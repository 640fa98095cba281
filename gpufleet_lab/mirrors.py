"""The lab's mirrors, served on the bridge address only: signed apt repos and a PEP 503 index.

Served tree (`<state>/www`), over http by `python3 -m http.server --bind <bridge ip>` (MIRROR_PORT) and over https
by https_server.py (MIRROR_HTTPS_PORT, a certificate of the lab's CA, tls.py), each started and stopped by PID:
  cuda/repos/{debian12,ubuntu2404,wsl-ubuntu}/x86_64/   flat repos of the stand-in NVIDIA packages
  debian/                                               flat repo of the real Debian 12 packages in OS_PACKAGES
  simple/<project>/                                     pip index: real pip/setuptools/wheel/ninja, stand-in torch
  packages/                                             the files the index links to
  files/xformers-0.0.35.tar.gz                          the real xformers sdist
Both apt repos are signed with a test key the lab generates in its state dir (never committed).
"""

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote

from packaging.utils import canonicalize_name

from gpufleet_lab import standins
from gpufleet_lab.paths import BRIDGE_IP, MIRROR_HTTPS_PORT, MIRROR_PORT
from gpufleet_lab.system import LabError, run
from gpufleet_lab.tls import ServerTls

CUDA_REPO_DIRS: tuple[str, ...] = ("debian12", "ubuntu2404", "wsl-ubuntu")
KEY_UID = "gpufleet lab test archive key <lab@gpufleet.invalid>"
HTTPS_SERVER = Path(__file__).with_name("https_server.py")


def ensure_signing_key(keys_dir: Path) -> bytes:
    """Create the lab's test signing key once per lab; return it as a binary keyring for signed-by."""
    home = keys_dir / "gnupg"
    keyring = keys_dir / "archive-keyring.gpg"
    if keyring.exists():
        return keyring.read_bytes()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", KEY_UID, "ed25519", "sign", "never"], env=env)
    exported = subprocess.run(["gpg", "--export", KEY_UID], env=env, check=True, capture_output=True).stdout
    keyring.write_bytes(exported)
    return exported


def sign_flat_repo(repo: Path, keys_dir: Path) -> None:
    """(Re)write Packages and a signed Release/InRelease for every .deb in `repo`."""
    env = {**os.environ, "GNUPGHOME": str(keys_dir / "gnupg")}
    packages = run(["apt-ftparchive", "packages", "."], env=env, cwd=repo).stdout
    (repo / "Packages").write_text(packages)
    for old in ("Release", "InRelease", "Release.gpg"):
        (repo / old).unlink(missing_ok=True)
    release = run(["apt-ftparchive", "-oAPT::FTPArchive::Release::Origin=gpufleet-lab",
                   "-oAPT::FTPArchive::Release::Label=gpufleet-lab", "release", "."], env=env, cwd=repo).stdout
    (repo / "Release").write_text(release)
    gpg = ["gpg", "--batch", "--yes", "--local-user", KEY_UID]
    run([*gpg, "--clearsign", "-o", str(repo / "InRelease"), str(repo / "Release")], env=env)
    run([*gpg, "--armor", "--detach-sign", "-o", str(repo / "Release.gpg"), str(repo / "Release")], env=env)


def cuda_repo(www: Path, repo_dir: str) -> Path:
    return www / "cuda" / "repos" / repo_dir / "x86_64"


def build_cuda_repos(www: Path, keys_dir: Path, keyring: bytes, kernel_release: str, driver_version: str) -> None:
    for repo_dir in CUDA_REPO_DIRS:
        repo = cuda_repo(www, repo_dir)
        repo.mkdir(parents=True, exist_ok=True)
        standins.cuda_keyring_deb(repo, keyring, repo_dir)
        standins.cuda_toolkit_deb(repo)
        standins.driver_debs(repo, version=driver_version)
        standins.cuda_metapackage_debs(repo, driver_version=driver_version)
        standins.linux_headers_deb(repo, kernel_release)
        sign_flat_repo(repo, keys_dir)


def publish_driver(www: Path, keys_dir: Path, version: str, branch: str = "580") -> None:
    """Add stand-in driver packages of `version` to every CUDA repo (older versions stay, as at NVIDIA)."""
    for repo_dir in CUDA_REPO_DIRS:
        repo = cuda_repo(www, repo_dir)
        standins.driver_debs(repo, branch=branch, version=version)
        sign_flat_repo(repo, keys_dir)


def publish_kernel(www: Path, keys_dir: Path, kernel_release: str) -> None:
    """Add a stand-in kernel `kernel_release` and its headers to every CUDA repo (the lab's stand-in repositories)."""
    for repo_dir in CUDA_REPO_DIRS:
        repo = cuda_repo(www, repo_dir)
        standins.linux_image_deb(repo, kernel_release)
        standins.linux_headers_deb(repo, kernel_release)
        sign_flat_repo(repo, keys_dir)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def build_os_repo(www: Path, keys_dir: Path, pool: Path) -> None:
    repo = www / "debian"
    repo.mkdir(parents=True, exist_ok=True)
    for deb in pool.glob("*.deb"):
        _link_or_copy(deb, repo / deb.name)
    sign_flat_repo(repo, keys_dir)


def _project(filename: str) -> str:
    return canonicalize_name(filename.split("-")[0])


def build_simple_index(www: Path, files: list[Path]) -> None:
    """Write a PEP 503 index for `files` (wheels or sdists), linking each with its sha256."""
    packages = www / "packages"
    packages.mkdir(parents=True, exist_ok=True)
    by_project: dict[str, list[str]] = {}
    for source in files:
        target = packages / source.name
        if not target.exists():
            _link_or_copy(source, target)
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        by_project.setdefault(_project(source.name), []).append(
            f'<a href="../../packages/{source.name}#sha256={digest}">{source.name}</a><br>')
    simple = www / "simple"
    simple.mkdir(exist_ok=True)
    for project, links in by_project.items():
        (simple / project).mkdir(exist_ok=True)
        (simple / project / "index.html").write_text(
            "<!DOCTYPE html>\n<html><body>\n" + "\n".join(sorted(links)) + "\n</body></html>\n")
    (simple / "index.html").write_text("<!DOCTYPE html>\n<html><body>\n" + "\n".join(
        f'<a href="{p}/">{p}</a><br>' for p in sorted(by_project)) + "\n</body></html>\n")


def place_file(www: Path, source: Path) -> Path:
    target = www / "files" / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        _link_or_copy(source, target)
    return target


def start_server(www: Path, pid_file: Path, log_file: Path) -> int:
    return _start(["python3", "-m", "http.server", "--bind", BRIDGE_IP, "--directory", str(www), str(MIRROR_PORT)],
                  MIRROR_PORT, pid_file, log_file)


def start_https_server(www: Path, tls: ServerTls, pid_file: Path, log_file: Path) -> int:
    """The same tree over https on MIRROR_HTTPS_PORT, with the lab CA's certificate for the bridge address."""
    return _start(["python3", str(HTTPS_SERVER), str(www), BRIDGE_IP, str(MIRROR_HTTPS_PORT), str(tls.cert),
                   str(tls.key)], MIRROR_HTTPS_PORT, pid_file, log_file)


def _start(command: list[str], port: int, pid_file: Path, log_file: Path) -> int:
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((BRIDGE_IP, port), timeout=1).close()
            return proc.pid
        except OSError:
            if proc.poll() is not None:
                raise LabError(f"mirror server exited ({proc.returncode}); see {log_file}")
            time.sleep(0.1)
    raise LabError(f"mirror server on {BRIDGE_IP}:{port} did not answer within 10 s; see {log_file}")


def stop_server(pid_file: Path, www: Path) -> None:
    """Kill the server whose PID the lab recorded, if that PID is still our server (PIDs get reused)."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text() or 0)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        cmdline = []
    if (b"http.server" in cmdline or str(HTTPS_SERVER).encode() in cmdline) and str(www).encode() in cmdline:
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink()


# http.server's access log line: '10.213.47.11 - - [28/Nov/2026 01:07:40] "GET /debian/x.deb HTTP/1.1" 200 -'.
_ACCESS = re.compile(r'^(\S+) - - \[[^\]]+\] "GET (\S+) HTTP/[\d.]+" (\d{3}) ')


def access_log(log_text: str) -> list[tuple[str, str, int]]:
    """(client address, path, status) of every GET the mirror server logged, in order."""
    found = []
    for line in log_text.splitlines():
        match = _ACCESS.match(line)
        if match:
            # The path as a file name: pip asks for torch-2.12.0...%2Bcu128-....whl, devpi for ...+cu128...
            found.append((match.group(1), unquote(match.group(2).split("?")[0]), int(match.group(3))))
    return found


def served_bytes(www: Path, requests: list[tuple[str, str, int]]) -> int:
    """Bytes the mirror sent for these requests: the size of each file answered with 200 (directories: 0)."""
    total = 0
    for _, path, status in requests:
        target = www / path.lstrip("/")
        if status == 200 and target.is_file():
            total += target.stat().st_size
    return total
