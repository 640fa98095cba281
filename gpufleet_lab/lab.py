"""The lab as one object: `Lab().up(3)` gives three SSH-reachable Debian 12 hosts with simulated GPUs and
local mirrors; `Lab().down()` removes everything the lab ever created, also what a crashed run left behind."""

import hashlib
import os
import pprint
import shutil
import subprocess
from pathlib import Path

from gpufleet_lab import (
    buildenv,
    downloads,
    hardware,
    hosts,
    mirrors,
    network,
    rootfs,
    standins,
    tls,
)
from gpufleet_lab.hosts import Host
from gpufleet_lab.hardware import COMPUTE_APPS, REBOOT_LOG
from gpufleet_lab.paths import BRIDGE_IP, STATE_DIR, host_ip, mirror_base_url, mirror_https_url
from gpufleet_lab.system import LabError, ensure_tools, run

DEFAULT_DRIVER_VERSION = "580.95.05-1"
LAB_PYTHON = "3.11"  # Debian 12's python3, what every lab host has


def prepare() -> None:
    """Install the lab's Debian tools and fill the cache (base image, OS packages, wheels, sdist); idempotent."""
    ensure_tools()
    rootfs.ensure_base()
    downloads.os_packages()
    downloads.wheels()
    downloads.cache_server_wheels()
    downloads.xformers_sdist()


class Lab:
    def __init__(self, state_dir: Path = STATE_DIR) -> None:
        self.state_dir = state_dir
        self.www = state_dir / "www"
        self.keys = state_dir / "keys"
        self.hosts_dir = state_dir / "hosts"
        self.known_hosts = state_dir / "known_hosts"
        self.control_key = self.keys / "control_ed25519"
        self.server_pid = state_dir / "mirror.pid"
        self.https_server_pid = state_dir / "mirror-https.pid"
        # Each server's access log, in mirrors.access_log's format.
        self.mirror_log = state_dir / "mirror.log"
        self.https_mirror_log = state_dir / "mirror-https.log"
        self.ca_cert = self.keys / "ca.crt"
        self.kernel_release = os.uname().release

    def up(self, count: int = 3, gpus: list[str] | None = None, build_env: bool = False,
           systemd: bool = False) -> list[Host]:
        """Tear down whatever is left, then build the network, mirrors and `count` hosts (see add_host)."""
        self.down()
        self.hosts_dir.mkdir(parents=True)
        self.keys.mkdir(mode=0o700)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gpufleet-lab-control", "-f", str(self.control_key)])
        self.known_hosts.touch()
        keyring = mirrors.ensure_signing_key(self.keys)
        network.create_bridge()
        self._build_mirrors(keyring)
        mirrors.start_server(self.www, self.server_pid, self.mirror_log)
        mirrors.start_https_server(self.www, tls.ensure_ca(self.keys, BRIDGE_IP), self.https_server_pid,
                                   self.https_mirror_log)
        return self.add_hosts(count, gpus, build_env, systemd)

    def _build_mirrors(self, keyring: bytes) -> None:
        mirrors.build_cuda_repos(self.www, self.keys, keyring, self.kernel_release, DEFAULT_DRIVER_VERSION)
        mirrors.build_os_repo(self.www, self.keys, downloads.os_packages())
        torch = standins.torch_wheel(self.state_dir / "built")
        wheels = {w.name: w for d in (downloads.wheels(), downloads.cache_server_wheels()) for w in d.glob("*.whl")}
        # The sdist is listed too, as on PyPI, so a devpi mirror of this index can serve it (fleet cache).
        mirrors.build_simple_index(self.www, [*sorted(wheels.values()), torch, downloads.xformers_sdist()])
        mirrors.place_file(self.www, downloads.xformers_sdist())

    def add_hosts(self, count: int, gpus: list[str] | None = None, build_env: bool = False,
                  systemd: bool = False) -> list[Host]:
        """`count` new hosts; `build_env` gives each the real CUDA 13.0 toolkit and torch venv (buildenv.py),
        `systemd` boots systemd as their PID 1 (hosts.py)."""
        created = [self.add_host(gpu=(gpus[i] if gpus else "5090d"), wait=False, build_env=build_env,
                                 systemd=systemd) for i in range(count)]
        for host in created:
            hosts.wait_ready(host)
        return created

    def add_host(self, gpu: str = "5090d", loaded_driver: str | None = None, wait: bool = True,
                 platform: str = "metal", build_env: bool = False, systemd: bool = False) -> Host:
        """Create and start one fresh host from the cached base; `gpu` is a key of hardware.GPUS,
        `platform` "metal" or "wsl" (WSL2 as the deploys see it; never a loaded Linux module).

        `systemd` boots /lib/systemd/systemd as the host's PID 1, which starts sshd and whatever services are
        installed later, as on a real host; otherwise sshd is PID 1 and nothing else runs unless started.

        `build_env` mounts this machine's real CUDA 13.0 toolkit (read-only, at buildenv.CUDA_HOME) and a host-own
        overlay of the cached real torch venv (at buildenv.VENV_PATH) into the host, so it can compile CUDA
        extensions for real; the GPU and the driver stay stand-ins. See `build_settings` for matching settings."""
        if not network.bridge_exists() or not self.control_key.exists():
            raise LabError("the lab is not up (no bridge or control key); start it with `python -m gpufleet_lab up`")
        if gpu not in hardware.GPUS:
            raise LabError(f"unknown lab GPU {gpu!r}; choose one of {sorted(hardware.GPUS)}")
        if platform not in ("metal", "wsl") or (platform == "wsl" and loaded_driver):
            raise LabError(f"lab platform {platform!r} with loaded_driver={loaded_driver!r}: use metal, or wsl "
                           "without a loaded driver (WSL's driver lives on Windows)")
        used = {h.index for h in self.hosts()}
        index = next(i for i in range(1, 241) if i not in used)
        name = f"lab{index:02d}"
        host = Host(name=name, index=index, ip=host_ip(index), gpu=gpu, loaded_driver=loaded_driver,
                    dir=str(self.hosts_dir / name), platform=platform, build_env=build_env, systemd=systemd)
        known = hosts.create(host, rootfs.base_dir(), self.control_key.with_suffix(".pub").read_text(),
                             (self.keys / "archive-keyring.gpg").read_bytes(), self.kernel_release,
                             self.ca_cert.read_bytes())
        with open(self.known_hosts, "a") as f:
            f.write(known + "\n")
        if wait:
            hosts.wait_ready(host)
        return host

    def restart_host(self, host: Host, timeout: float = 60.0) -> None:
        """Restart the host, the lab's reboot: its PID 1 stops (systemd powers off, stopping its services; after
        `timeout` s whatever is left is killed), then it boots again on the same overlay and is reachable. What the
        host wrote to disk survives; /run and processes do not; /proc/uptime drops as after a reboot."""
        hosts.halt(host, timeout)
        (host.path / "uptime").write_text(hardware.UPTIME_AFTER_REBOOT)
        hosts.start(host)
        hosts.wait_ready(host)

    def remove_host(self, host: Host) -> None:
        hosts.stop(host.name, host.path)
        lines = self.known_hosts.read_text().splitlines()
        self.known_hosts.write_text("".join(f"{l}\n" for l in lines if not l.startswith(f"{host.ip} ")))
        shutil.rmtree(host.path)

    def hosts(self) -> list[Host]:
        if not self.hosts_dir.exists():
            return []
        return sorted((Host.load(d) for d in self.hosts_dir.iterdir() if (d / "host.json").exists()),
                      key=lambda h: h.index)

    def host(self, name: str) -> Host:
        for host in self.hosts():
            if host.name == name:
                return host
        raise LabError(f"no lab host named {name!r}; running: {[h.name for h in self.hosts()]}")

    def down(self) -> None:
        """Remove every lab process (by PID), mount, namespace, the bridge and the state dir; safe to repeat."""
        if self.hosts_dir.exists():
            for host_dir in self.hosts_dir.iterdir():
                hosts.stop(host_dir.name, host_dir)
        for ns in network.lab_namespaces():  # namespaces whose host dir a crash already lost
            hosts.kill_pids(network.netns_pids(ns))
            network.delete_netns(ns)
        if hosts.lab_cgroup() is not None:  # systemd hosts' cgroups, also those of a crashed lab
            hosts.remove_cgroup(hosts.lab_cgroup())
        mirrors.stop_server(self.server_pid, self.www)
        mirrors.stop_server(self.https_server_pid, self.www)
        hosts.unmount_all(self.state_dir)
        network.delete_stray_veths()
        network.delete_bridge()
        leftover = hosts.mounts_under(self.state_dir)
        if leftover:
            raise LabError(f"lab teardown: still mounted: {leftover}; nothing under {self.state_dir} was deleted")
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def status(self) -> dict[str, object]:
        return {
            "state_dir": str(self.state_dir),
            "base": str(rootfs.base_dir()) if (rootfs.base_dir() / ".complete").exists() else None,
            "bridge": f"{network.BRIDGE_NAME} {BRIDGE_IP}" if network.bridge_exists() else None,
            "mirror": mirror_base_url() if self.server_pid.exists() else None,
            "mirror_https": mirror_https_url() if self.https_server_pid.exists() else None,
            "hosts": [{"name": h.name, "ip": h.ip, "platform": h.platform, "gpu": h.gpu, "systemd": h.systemd,
                       "loaded_driver": h.loaded_driver,
                       "processes": len(network.netns_pids(h.netns))} for h in self.hosts()],
            "stray_namespaces": sorted(set(network.lab_namespaces()) - {h.netns for h in self.hosts()}),
        }

    def set_loaded_driver(self, host: Host, version: str | None) -> None:
        """Simulate the open module `version` (e.g. "580.95.05") being loaded, as after a reboot; None = unloaded."""
        hardware.write_loaded_driver(host.path / "procdriver", version)
        host.loaded_driver = version
        host.save()

    def install_standin_reboot(self, host: Host) -> None:
        """Give `host` a STAND-IN `reboot` (/usr/local/sbin, first on root's PATH, before the base's systemd one)
        that does what a reboot does to what gpufleet reads: the module on disk becomes the loaded one (or none when
        none is installed), /proc/uptime drops, and the call is noted in REBOOT_LOG. The host keeps running, so
        reboot_policy: auto and pyinfra's server.reboot (which waits for a lower uptime) run for real."""
        line = hardware.module_version_line("$v").replace("\n", "\\n")
        script = (
            "#!/bin/sh\n# gpufleet lab STAND-IN for reboot: loads the module on disk, resets uptime; kills nothing.\n"
            f'echo "reboot $*" >> {REBOOT_LOG}\n'
            "v=$(modinfo -F version nvidia 2>/dev/null || true)\n"
            'if [ -n "$v" ]; then mkdir -p /proc/driver/nvidia; '
            f'printf "{line}" > /proc/driver/nvidia/version\n'
            "else rm -rf /proc/driver/nvidia; fi\n"
            f"printf '{hardware.UPTIME_AFTER_REBOOT.strip()}\\n' > /proc/uptime\n"
        )
        target = host.root / "usr/local/sbin/reboot"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(script)
        target.chmod(0o755)

    def reboots(self, host: Host) -> int:
        """How many times the stand-in reboot ran on `host`."""
        log = host.root / REBOOT_LOG.lstrip("/")
        return len(log.read_text().splitlines()) if log.exists() else 0

    def set_compute_apps(self, host: Host, apps: list[tuple[int, str, int]]) -> None:
        """Make the host's stand-in nvidia-smi report GPU compute processes (pid, name, MiB); [] for none."""
        target = host.root / COMPUTE_APPS.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(f"{pid}, {name}, {mib} MiB\n" for pid, name, mib in apps))

    def set_windows_driver(self, host: Host, version: str) -> None:
        """Simulate a WSL host's Windows driver at `version` (e.g. "591.44"), as after an update on Windows."""
        if host.platform != "wsl":
            raise LabError(f"lab host {host.name} is {host.platform}, not wsl: it has no Windows driver")
        hosts.set_windows_driver(host, version)

    def publish_driver(self, version: str, branch: str = "580") -> None:
        """Add stand-in driver packages `version` (e.g. "580.105.08-1") to the CUDA repos, re-signed."""
        mirrors.publish_driver(self.www, self.keys, version, branch)

    def publish_kernel(self, kernel_release: str) -> None:
        """Add a stand-in kernel package linux-image-<release> and linux-headers-<release> to the CUDA repos."""
        mirrors.publish_kernel(self.www, self.keys, kernel_release)

    def processes(self, host: Host) -> dict[int, str]:
        """PID (as seen here) -> command line of every process running in `host`."""
        found = {}
        for pid in network.netns_pids(host.netns):
            try:
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
        return found

    def cut_ssh_sessions(self, host: Host) -> list[int]:
        """Kill, by PID, every process of the host's SSH sessions (all but its sshd listener): a dropped link.
        Only on a host whose PID 1 is sshd: on a systemd host it would kill its services too."""
        if host.systemd:
            raise LabError(f"lab host {host.name} boots systemd: cut_ssh_sessions would kill its services too")
        victims = []
        for pid in network.netns_pids(host.netns):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            nspids = next(line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:"))
            if len(nspids) > 1 and nspids[-1] != "1":  # inside the host's PID namespace, not its PID 1
                victims.append(pid)
        hosts.kill_pids(victims)
        return victims

    def ssh_command(self, host: Host, command: str) -> list[str]:
        return ["ssh", "-i", str(self.control_key), "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                f"root@{host.ip}", command]

    def ssh(self, host: Host, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.ssh_command(host, command), capture_output=True, text=True, timeout=timeout,
                              check=False)

    def mirror_settings(self) -> dict[str, object]:
        """gpufleet settings (names from group_data/all.py) that point a host at the lab's mirrors."""
        base = mirror_base_url()
        return {
            "cuda_repo_url": f"{base}/cuda/repos",
            "cuda_keyring_sha256": {
                repo_dir: hashlib.sha256((mirrors.cuda_repo(self.www, repo_dir) / "cuda-keyring_1.1-1_all.deb")
                                         .read_bytes()).hexdigest() for repo_dir in mirrors.CUDA_REPO_DIRS},
            "torch_index_url": f"{base}/simple",
            "pip_index_url": f"{base}/simple",
            "pip_trusted_hosts": [BRIDGE_IP],
            "xformers_source_url": f"{base}/files/xformers-{downloads.XFORMERS_VERSION}.tar.gz",
        }

    def https_mirror_settings(self) -> dict[str, object]:
        """mirror_settings with the CUDA repository, both pip indexes and the sdist over https (the lab CA's
        certificate, which every lab host trusts): no pip_trusted_hosts."""
        http, https = mirror_base_url(), mirror_https_url()
        found = self.mirror_settings()
        for key in ("cuda_repo_url", "torch_index_url", "pip_index_url", "xformers_source_url"):
            found[key] = https + str(found[key]).removeprefix(http)
        found["pip_trusted_hosts"] = []
        return found

    def build_settings(self) -> dict[str, object]:
        """gpufleet settings that make the stages use a build_env host's real toolkit and adopt its torch venv.

        The loaded driver must be an open 580 module (`set_loaded_driver`): the stand-in driver is accepted as is.
        """
        versions = buildenv.venv_versions()
        return {
            "driver_accept_existing": True,
            "cuda_version": buildenv.CUDA_VERSION,
            "cuda_existing_home": buildenv.CUDA_HOME,
            "python_version": ".".join(versions["python"].split(".")[:2]),
            "venv_path": buildenv.VENV_PATH,
            "venv_adopt": True,
            "torch_version": versions["torch"],
        }

    def connection(self, host: Host, user: str = "root") -> dict[str, object]:
        """A YAML inventory host entry; `user` is "root" or rootfs.SUDO_USER (then with sudo)."""
        return {"address": host.ip, "ssh_user": user, "ssh_port": 22, "ssh_key": str(self.control_key),
                "ssh_known_hosts_file": str(self.known_hosts), "sudo": user != "root"}

    def write_inventory_yaml(self, path: Path, selected: list[Host] | None = None,
                             extra_hosts: dict[str, dict[str, object]] | None = None, user: str = "root",
                             settings: dict[str, object] | None = None) -> Path:
        """gpufleet YAML inventory (inventory/hosts.yaml format) for the lab hosts, mirror settings (and `settings`)
        on top.

        WSL hosts go to the `wsl` group, the others (and `extra_hosts`) to `workstations`; both groups get
        python_version 3.11 because every lab host runs Debian 12's Python.
        """
        import yaml
        chosen = selected or self.hosts()
        groups = {}
        for group, platform in (("workstations", "metal"), ("wsl", "wsl")):
            entries = {h.name: {**self.connection(h, user), "settings": {}} for h in chosen if h.platform == platform}
            if group == "workstations":
                entries.update(extra_hosts or {})
            groups[group] = {"settings": {"python_version": LAB_PYTHON}, "hosts": entries}
        document = {"settings": {**self.mirror_settings(), **(settings or {})}, "groups": groups}
        path.write_text("# written by `python -m gpufleet_lab`; lab hosts are stand-ins, see gpufleet_lab\n"
                        + yaml.safe_dump(document, sort_keys=False))
        return path

    def write_inventory_py(self, path: Path, selected: list[Host] | None = None,
                           extra_hosts: dict[str, str] | None = None, user: str = "root") -> Path:
        """pyinfra-native inventory: strict host key checking against the lab's known_hosts, mirror settings as data.

        `extra_hosts` maps a name to an address with no lab host behind it (to test unreachable hosts);
        `user` other than root (rootfs.SUDO_USER) connects as that user and runs operations with sudo.
        """
        sudo: dict[str, object] = {"_sudo": True} if user != "root" else {}
        common = {"ssh_user": user, **sudo, "ssh_key": str(self.control_key),
                  "ssh_known_hosts_file": str(self.known_hosts), "ssh_strict_host_key_checking": "yes",
                  "ssh_connect_timeout": 5, "python_version": LAB_PYTHON, **self.mirror_settings()}
        chosen = selected or self.hosts()
        metal = [(h.name, {"ssh_hostname": h.ip, **common}) for h in chosen if h.platform == "metal"]
        metal += [(name, {"ssh_hostname": address, **common}) for name, address in (extra_hosts or {}).items()]
        wsl = [(h.name, {"ssh_hostname": h.ip, **common}) for h in chosen if h.platform == "wsl"]
        path.write_text("# written by gpufleet_lab; lab hosts are stand-ins, see gpufleet_lab\n"
                        f"workstations = {pprint.pformat(metal, width=110)}\n"
                        f"wsl = {pprint.pformat(wsl, width=110)}\n")
        return path
