"""Test hosts: an overlay over the cached Debian base, its own network namespace, and a PID 1 of its own
PID/mount/UTS/IPC namespaces, chrooted into the overlay: sshd, or (`systemd=True`) /lib/systemd/systemd, which
then starts sshd and every other service as on a real host.

A systemd host also gets a cgroup namespace rooted in a cgroup of its own on this machine's cgroup2 hierarchy
(`<cgroup2>/gpufleet-lab<N>/<host>`), mounted writable at its /sys/fs/cgroup, so its systemd manages its services'
cgroups (unified mode, no controllers needed) and nothing above them; `container=gpufleet-lab` in PID 1's
environment tells systemd it runs in a container. `restart` is the lab's reboot: PID 1 is stopped (systemd
powers off cleanly) and the host boots again on the same overlay, so what it wrote to disk survives.

Inside a host: /proc is its own (its PIDs only) with /proc/sys read-only and sysrq-trigger/kcore masked; /sys
is read-only with the lab's fake PCI tree over /sys/bus/pci; /proc/driver is the lab's writable tmpfs (see
hardware.py); /dev is a small tmpfs with its own devpts. Root on a host cannot load kernel modules, set the
clock or touch raw I/O (dropped from its capability bounding set), so nothing it runs reaches this machine's
kernel state; `reboot -f` on a host only ends that host (reboot(2) in a PID namespace kills its PID 1).
Everything a host runs lives in its network namespace, so `ip netns pids <ns>` finds every process to kill, also
after the lab itself crashed.
"""

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from gpufleet_lab import buildenv, hardware, network, standins
from gpufleet_lab.paths import CGROUP_NAME, mirror_base_url
from gpufleet_lab.rootfs import SUDO_USER
from gpufleet_lab.system import LabError, run

OS_KEYRING = "/usr/share/keyrings/gpufleet-lab-archive.gpg"

# Runs in the new namespaces before PID 1: $1 root, $2 hostname, $3 /proc/driver source, $4 /sys/bus/pci source,
# $5 a file to show as /proc/sys/kernel/osrelease, or "" for the real one; $6 a writable file shown as /proc/uptime
# (the lab's stand-in reboot lowers it, as a real reboot would, so pyinfra's server.reboot sees the host come back);
# $7 "systemd" to boot systemd (in its own cgroup namespace already), anything else for sshd alone.
NAMESPACE_SETUP = r"""
set -e
R="$1"
hostname "$2"
mount -t proc proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro "$R/proc/sys"
if [ -n "$5" ]; then mount --bind "$5" "$R/proc/sys/kernel/osrelease"; fi
mount --bind "$6" "$R/proc/uptime"
mount --bind "$3" "$R/proc/driver"
mount -t sysfs -o ro sysfs "$R/sys"
mount --bind "$4" "$R/sys/bus/pci"
mount -t tmpfs -o mode=755,nosuid tmpfs "$R/dev"
mknod -m 666 "$R/dev/null" c 1 3; mknod -m 666 "$R/dev/zero" c 1 5; mknod -m 666 "$R/dev/full" c 1 7
mknod -m 666 "$R/dev/random" c 1 8; mknod -m 666 "$R/dev/urandom" c 1 9; mknod -m 666 "$R/dev/tty" c 5 0
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"
mount -t tmpfs -o mode=1777 tmpfs "$R/dev/shm"
ln -s pts/ptmx "$R/dev/ptmx"; ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"; ln -s /proc/self/fd/1 "$R/dev/stdout"; ln -s /proc/self/fd/2 "$R/dev/stderr"
mount -t tmpfs -o mode=755 tmpfs "$R/run"
mkdir -p "$R/run/sshd" "$R/run/lock"
for masked in sysrq-trigger kcore; do
  if [ -e "$R/proc/$masked" ]; then mount --bind /dev/null "$R/proc/$masked"; fi
done
DROP="-sys_module,-sys_time,-sys_rawio,-syslog"
if [ "$7" = systemd ]; then
  mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
  exec setpriv --bounding-set "$DROP" chroot "$R" /usr/bin/env -i container=gpufleet-lab /lib/systemd/systemd
fi
exec setpriv --bounding-set "$DROP" chroot "$R" /usr/sbin/sshd -D -e
"""

# Units a lab host does without: apt's daily timers would take dpkg's lock in the middle of a test; the host has
# no console to put a getty on.
SYSTEMD_MASKED = ("apt-daily.timer", "apt-daily-upgrade.timer", "getty@tty1.service", "console-getty.service")

SSHD_CONFIG = """# gpufleet lab: key-only root login, one host key per host
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
MaxStartups 100:30:200
"""


@dataclass
class Host:
    name: str
    index: int
    ip: str
    gpu: str
    loaded_driver: str | None
    dir: str
    platform: str = "metal"  # or "wsl": WSL2 as the deploys see it (hardware.py)
    pid: int | None = None
    # A real CUDA toolkit and torch venv to compile against (buildenv.py).
    build_env: bool = False
    # systemd as PID 1 (it starts sshd), instead of sshd alone.
    systemd: bool = False

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @property
    def root(self) -> Path:
        return self.path / "root"

    @property
    def netns(self) -> str:
        return network.netns_name(self.name)

    def save(self) -> None:
        (self.path / "host.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, host_dir: Path) -> "Host":
        return cls(**json.loads((host_dir / "host.json").read_text()))


def cgroup2_root() -> Path | None:
    """Where this machine's cgroup2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid
    cgroup v1 machine); None without one."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, fs = line.partition(" - ")
        if fs.split()[:1] == ["cgroup2"]:
            return Path(fields.split()[4])
    return None


def lab_cgroup() -> Path | None:
    """The cgroup holding this lab instance's systemd hosts (it may not exist yet)."""
    root = cgroup2_root()
    return root / CGROUP_NAME if root else None


def host_cgroup(host_name: str) -> Path:
    parent = lab_cgroup()
    if parent is None:
        raise LabError(f"lab host {host_name}: systemd hosts need a cgroup2 hierarchy, and this machine has none "
                       "mounted (see /proc/self/mountinfo); mount one at /sys/fs/cgroup/unified")
    return parent / host_name


def remove_cgroup(path: Path, timeout: float = 10.0) -> None:
    """Remove a cgroup and every cgroup below it, deepest first; its processes must be ending already."""
    if not path.is_dir():
        return
    below = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    deadline = time.monotonic() + timeout
    for group in [*below, path]:
        while True:
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as error:  # EBUSY while a dying process still counts as a member
                if time.monotonic() > deadline:
                    raise LabError(f"cannot remove the lab cgroup {group}: {error}; its processes: "
                                   f"{(group / 'cgroup.procs').read_text().split()}") from error
                time.sleep(0.05)


def mounts_under(prefix: Path) -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(prefix) or point.startswith(f"{prefix}/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def unmount_all(prefix: Path) -> None:
    for point in mounts_under(prefix):
        if run(["umount", point], check=False).returncode != 0:
            run(["umount", "--lazy", point], check=False)


def _alive(pid: int) -> bool:
    """True while `pid` runs; reaps it when it is our own exited child (hosts started by this process)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_pids(pids: list[int], timeout: float = 5.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise LabError(f"processes {[p for p in pids if _alive(p)]} survived SIGKILL for {timeout:.0f} s")
        time.sleep(0.02)


def _write(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    path.chmod(mode)


def personalise(host: Host, control_pubkey: str, keyring: bytes, kernel_release: str) -> str:
    """Write what makes the overlay this host; return its known_hosts line."""
    root = host.root
    _write(root / "etc/hostname", host.name + "\n")
    _write(root / "etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {host.name}\n")
    _write(root / "etc/resolv.conf", "# gpufleet lab: no DNS; mirrors are addressed by IP\n")
    key = host.path / "ssh_host_ed25519_key"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{host.name}", "-f", str(key)])
    _write(root / "etc/ssh/ssh_host_ed25519_key", key.read_bytes(), 0o600)
    _write(root / "etc/ssh/ssh_host_ed25519_key.pub", key.with_suffix(".pub").read_bytes())
    _write(root / "etc/ssh/sshd_config.d/gpufleet-lab.conf", SSHD_CONFIG)
    (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    _write(root / "root/.ssh/authorized_keys", control_pubkey, 0o600)
    admin = next(line.split(":") for line in (root / "etc/passwd").read_text().splitlines()
                 if line.startswith(f"{SUDO_USER}:"))
    admin_ssh = root / "home" / SUDO_USER / ".ssh"
    admin_ssh.mkdir(mode=0o700, exist_ok=True)
    _write(admin_ssh / "authorized_keys", control_pubkey, 0o600)
    for path in (admin_ssh, admin_ssh / "authorized_keys"):
        os.chown(path, int(admin[2]), int(admin[3]))
    _write(root / OS_KEYRING.lstrip("/"), keyring)
    _write(root / "etc/apt/sources.list.d/gpufleet-lab-debian.list",
           f"deb [signed-by={OS_KEYRING}] {mirror_base_url()}/debian/ /\n")
    modules = root / "lib/modules" / kernel_release
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        _write(modules / name, "")  # what the installed kernel image would ship
    kind, blob = key.with_suffix(".pub").read_text().split()[:2]
    return f"{host.ip} {kind} {blob}"


def make_wsl(host: Host) -> None:
    """What WSL2 adds: its kernel release string, Windows' driver tools under /usr/lib/wsl/lib (stand-ins), and
    Ubuntu 24.04's os-release (the packages stay Debian 12's)."""
    (host.path / "osrelease").write_text(hardware.WSL_KERNEL_RELEASE + "\n")
    os_release = host.root / "etc/os-release"
    os_release.unlink()  # Debian's is a link into /usr/lib; replace the link, not its target
    _write(os_release, hardware.UBUNTU_2404_OS_RELEASE)
    _write(host.root / "usr/lib/wsl/lib/libcuda.so.1", b"gpufleet lab stand-in for the WSL libcuda stub\n")
    set_windows_driver(host, hardware.WSL_DRIVER_VERSION)


def set_windows_driver(host: Host, version: str) -> None:
    """Make WSL's stand-in nvidia-smi report the Windows driver `version` (a GPU-less host gets none)."""
    spec = hardware.GPUS[host.gpu]
    if spec is None:
        return
    _write(host.root / "usr/lib/wsl/lib/nvidia-smi", standins.nvidia_smi_script(version, spec.device_id), 0o755)


def make_systemd(host: Host) -> None:
    """What a systemd host needs beyond the base: its own machine id, and the units it does without masked."""
    _write(host.root / "etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
    units = host.root / "etc/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    for unit in SYSTEMD_MASKED:
        link = units / unit
        if not link.is_symlink():
            link.symlink_to("/dev/null")


def create(host: Host, base: Path, control_pubkey: str, keyring: bytes, kernel_release: str,
           ca_pem: bytes | None = None) -> str:
    """Build and start one host (trusting the lab CA ca_pem); return its known_hosts line. Stops halfway only by
    raising."""
    path = host.path
    if host.build_env:
        buildenv.ensure_venv()  # before any mount: building it the first time takes minutes
    for sub in ("upper", "work", "root", "pci", "procdriver"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    host.save()
    network.create_host_netns(host.name, host.ip)
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={base},upperdir={path / 'upper'},workdir={path / 'work'}", str(host.root)])
    run(["mount", "-t", "tmpfs", "-o", "mode=755,size=1m", "tmpfs", str(path / "pci")])
    run(["mount", "-t", "tmpfs", "-o", "mode=755,size=1m", "tmpfs", str(path / "procdriver")])
    hardware.write_pci_tree(path / "pci", host.gpu, wsl=host.platform == "wsl")
    hardware.write_loaded_driver(path / "procdriver", host.loaded_driver)
    (path / "uptime").write_text(hardware.UPTIME_BEFORE_REBOOT)
    known_host = personalise(host, control_pubkey, keyring, kernel_release)
    if host.platform == "wsl":
        make_wsl(host)
    if host.systemd:
        make_systemd(host)
    if host.build_env:
        buildenv.mount_into(host.root, path)
    # Before the host runs: a running systemd host's own mounts (its /tmp) are not what a chroot from here sees.
    if ca_pem is not None:
        trust_ca(host, ca_pem)
    start(host)
    return known_host


def start(host: Host) -> None:
    """Boot the host's PID 1 (sshd, or systemd) in new namespaces over its overlay; returns at once."""
    command = ["ip", "netns", "exec", host.netns, "unshare", "--pid", "--mount", "--uts", "--ipc",
               *(["--cgroup"] if host.systemd else []), "--fork", "--kill-child", "--propagation", "private",
               "sh", "-c", NAMESPACE_SETUP, "gpufleet-lab-host",
               str(host.root), host.name, str(host.path / "procdriver"), str(host.path / "pci"),
               str(host.path / "osrelease") if host.platform == "wsl" else "", str(host.path / "uptime"),
               "systemd" if host.systemd else "sshd"]
    if host.systemd:
        # Into the host's own cgroup first: `unshare --cgroup` makes the cgroup it starts in the host's root.
        cgroup = host_cgroup(host.name)
        cgroup.mkdir(parents=True, exist_ok=True)
        command = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *command]
    with open(host.path / "sshd.log", "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    host.pid = proc.pid
    host.save()


def init_pid(host: Host) -> int | None:
    """The host's PID 1, as this machine numbers it; None when it is not running."""
    for pid in network.netns_pids(host.netns):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        nspids = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
        if len(nspids) > 1 and nspids[-1] == "1":
            return pid
    return None


def halt(host: Host, timeout: float = 60.0) -> None:
    """End everything the host runs, keeping its overlay and mounts: systemd is asked to power off (SIGRTMIN+4)
    and given `timeout` seconds to stop its services; what is left then is killed, as is an sshd host at once."""
    init = init_pid(host) if host.systemd else None
    if init is not None:
        os.kill(init, signal.SIGRTMIN + 4)
        deadline = time.monotonic() + timeout
        while _alive(init) and time.monotonic() < deadline:
            time.sleep(0.1)
    kill_pids(network.netns_pids(host.netns))
    if host.pid is not None:
        _alive(host.pid)  # reap our own unshare, when this process started it
    if host.systemd:
        remove_cgroup(host_cgroup(host.name))


def wait_ready(host: Host, timeout: float | None = None) -> None:
    # systemd boots its units first (under load, tens of seconds on this 2-core machine).
    timeout = timeout or (90.0 if host.systemd else 20.0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.ip, 22), timeout=1) as conn:
                if conn.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.05)
    raise LabError(f"lab host {host.name} ({host.ip}): sshd did not answer within {timeout:.0f} s; "
                   f"see {host.path / 'sshd.log'}")


def stop(host_name: str, host_dir: Path) -> None:
    """Kill every process in the host's network namespace, unmount its mounts, delete the namespace."""
    ns = network.netns_name(host_name)
    if ns in network.lab_namespaces():
        kill_pids(network.netns_pids(ns))
    if lab_cgroup() is not None:
        remove_cgroup(host_cgroup(host_name))
    unmount_all(host_dir)
    network.delete_netns(ns)
    run(["ip", "link", "del", network.veth_name(host_name)], check=False)  # gone with the namespace, unless pinned
    leftover = mounts_under(host_dir)
    if leftover:
        raise LabError(f"lab host {host_name}: still mounted after teardown: {leftover}; unmount them by hand")


LAB_CA = "/usr/local/share/ca-certificates/gpufleet-lab-ca.crt"


def trust_ca(host: Host, ca_pem: bytes) -> None:
    """Install the lab CA's certificate into the host's system trust store, as an admin installs an internal CA:
    the file under /usr/local/share/ca-certificates, then the host's own update-ca-certificates."""
    _write(host.root / LAB_CA.lstrip("/"), ca_pem)
    run(["chroot", str(host.root), "update-ca-certificates"])
