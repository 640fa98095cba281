"""The lab's hosts behave like the machines the deploys target, through real tools.

GPU, NVIDIA packages and torch on these hosts are STAND-INS (see gpufleet_lab/standins.py and hardware.py);
lspci, modinfo, dpkg, apt, pip and sshd are the real programs.
"""

import hashlib
import stat
import subprocess
from pathlib import Path

import pytest

from gpufleet_lab import Lab
from gpufleet_lab.hosts import Host
from gpufleet_lab.paths import BRIDGE_IP, MIRROR_PORT, mirror_base_url, mirror_https_url

MIRROR = mirror_base_url()

pytestmark = pytest.mark.lab


def ok(lab: Lab, host: Host, command: str) -> str:
    result = lab.ssh(host, command)
    assert result.returncode == 0, f"{host.name}: `{command}` failed ({result.returncode}):\n{result.stderr}{result.stdout}"
    return result.stdout


def test_real_lspci_sees_the_simulated_gpu_chosen_per_host(lab: Lab) -> None:
    hosts = {gpu: lab.add_host(gpu=gpu) for gpu in ("5090d", "5090dv2", "none")}
    try:
        assert "[10de:2b87]" in ok(lab, hosts["5090d"], "lspci -nn")
        assert "[10de:2b8c]" in ok(lab, hosts["5090dv2"], "lspci -nn")
        assert "10de:" not in ok(lab, hosts["none"], "lspci -nn")
    finally:
        for host in hosts.values():
            lab.remove_host(host)


def test_wsl_host_looks_like_wsl2_to_the_deploys_facts(lab: Lab) -> None:
    host = lab.add_host(gpu="5090d", platform="wsl")
    try:
        assert ok(lab, host, "cat /proc/sys/kernel/osrelease").strip().endswith("microsoft-standard-WSL2")
        assert "10de:" not in ok(lab, host, "lspci -nn")  # WSL2 shows Microsoft's render device only
        assert lab.ssh(host, "test -e /proc/driver/nvidia/version").returncode == 1
        assert lab.ssh(host, "command -v nvidia-smi").returncode == 1  # off PATH, as in WSL
        query = "/usr/lib/wsl/lib/nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader"
        assert ok(lab, host, query).strip() == "NVIDIA GeForce RTX 5090 D, 12.0"
    finally:
        lab.remove_host(host)


def test_hosts_reach_the_lab_mirror_and_nothing_else(lab: Lab, lab_hosts: list[Host]) -> None:
    host = lab_hosts[0]
    probe = "python3 -c 'import socket; socket.create_connection((\"{}\", {}), timeout=3)'"
    assert lab.ssh(host, probe.format(BRIDGE_IP, MIRROR_PORT)).returncode == 0
    outside = lab.ssh(host, probe.format("1.1.1.1", 80))
    assert outside.returncode != 0 and "Network is unreachable" in outside.stderr


def test_hosts_trust_the_lab_ca_whose_key_stays_root_only_on_this_machine(lab: Lab, lab_hosts: list[Host]) -> None:
    host = lab_hosts[0]
    index = f"{mirror_https_url()}/simple/torch/"
    # curl and Python verify the certificate against the host's system store, and its name against the address.
    assert "torch-" in ok(lab, host, f"curl -fsS {index}")
    assert "torch-" in ok(lab, host, f"python3 -c 'import urllib.request; print(urllib.request.urlopen(\"{index}\")"
                                     ".read().decode())'")
    # Verification is real: the same request against a public CA alone is refused.
    other = "/usr/share/ca-certificates/mozilla/ISRG_Root_X1.crt"
    refused = lab.ssh(host, f"curl -fsS --cacert {other} --capath /nonexistent {index}")
    assert refused.returncode == 60 and "certificate" in refused.stderr, refused.stderr
    # The CA's key never reaches a host; on this machine only root reads it.
    keys = lab.keys
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert stat.S_IMODE((keys / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((keys / "mirror-tls.key").stat().st_mode) == 0o600
    assert lab.ssh(host, "grep -rl 'PRIVATE KEY' /usr/local/share/ca-certificates /etc/ssl/certs").stdout == ""


def test_host_with_unknown_key_is_refused(lab: Lab, lab_hosts: list[Host], tmp_path) -> None:
    empty = tmp_path / "known_hosts"
    empty.touch()
    command = lab.ssh_command(lab_hosts[0], "true")
    command[command.index(f"UserKnownHostsFile={lab.known_hosts}")] = f"UserKnownHostsFile={empty}"
    refused = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert refused.returncode == 255 and "Host key verification failed" in refused.stderr


def test_stand_in_driver_answers_like_the_real_one_through_install_load_and_update(lab: Lab) -> None:
    host = lab.add_host(gpu="5090d")
    try:
        ok(lab, host, f"curl -sSfo /tmp/k.deb {MIRROR}/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb"
                      " && dpkg -i /tmp/k.deb && rm /etc/apt/sources.list.d/cuda-debian12-x86_64.list"
                      " && echo 'deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg]"
                      f" {MIRROR}/cuda/repos/debian12/x86_64/ /' > /etc/apt/sources.list.d/cuda.list"
                      " && apt-get update -q")
        install = "DEBIAN_FRONTEND=noninteractive apt-get install -y -q nvidia-open-580"
        no_headers = lab.ssh(host, install)
        assert "kernel headers" in no_headers.stdout + no_headers.stderr
        assert lab.ssh(host, "modinfo -F version nvidia").returncode != 0  # DKMS built nothing
        ok(lab, host, "apt-get install -y -q linux-headers-$(uname -r) && apt-get install -y -q --reinstall nvidia-dkms-580-open")
        assert ok(lab, host, "modinfo -F version nvidia").strip() == "580.95.05"
        assert lab.ssh(host, "nvidia-smi").returncode == 9  # installed, not loaded until a reboot
        lab.set_loaded_driver(host, "580.95.05")
        query = "nvidia-smi --query-gpu=name,pci.device_id,compute_cap,driver_version --format=csv,noheader"
        assert ok(lab, host, query).strip() == "NVIDIA GeForce RTX 5090 D, 0x2B8710DE, 12.0, 580.95.05"
        lab.publish_driver("580.105.08-1")
        ok(lab, host, f"apt-get update -q && {install}")
        assert ok(lab, host, "dpkg-query -W -f '${Version}' nvidia-open-580") == "580.105.08-1"
        assert ok(lab, host, "modinfo -F version nvidia").strip() == "580.105.08"
        mismatch = lab.ssh(host, query)
        assert mismatch.returncode == 18 and "Driver/library version mismatch" in mismatch.stdout
    finally:
        lab.remove_host(host)


def test_pip_index_serves_stand_in_torch_and_the_real_xformers_sdist(lab: Lab, lab_hosts: list[Host]) -> None:
    host = lab_hosts[0]
    settings = lab.mirror_settings()
    ok(lab, host, f"python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -q --pre "
                  f"--index-url {settings['torch_index_url']} --trusted-host {BRIDGE_IP} 'torch==2.12.0.dev20260407+cu128'")
    reported = ok(lab, host, "/tmp/venv/bin/python -c 'import torch; print(torch.__version__, torch.version.cuda, "
                             "torch.cuda.get_arch_list())'")
    assert reported.startswith("2.12.0.dev20260407+cu128 12.8") and "sm_120" in reported
    ok(lab, host, f"/tmp/venv/bin/pip install -q --index-url {settings['pip_index_url']} --trusted-host {BRIDGE_IP} ninja")
    sdist = ok(lab, host, f"curl -sSf {settings['xformers_source_url']} | sha256sum").split()[0]
    assert sdist == "f7fc183a58e4bf0e2ae339a18fb1b1d4a37854c0f2545b4f360fef001646ab76"
    keyring = subprocess.run(lab.ssh_command(host, f"curl -sSf {settings['cuda_repo_url']}/debian12/x86_64/cuda-keyring_1.1-1_all.deb"),
                             capture_output=True, timeout=60, check=False).stdout
    assert hashlib.sha256(keyring).hexdigest() == settings["cuda_keyring_sha256"]["debian12"]  # type: ignore[index]


def test_build_env_hosts_compile_with_the_real_toolkit_and_keep_their_venv_changes_to_themselves(lab: Lab) -> None:
    from gpufleet_lab import buildenv

    first, second = lab.add_hosts(2, build_env=True)
    try:
        assert "release 13.0" in ok(lab, first, f"{buildenv.CUDA_HOME}/bin/nvcc --version")
        assert lab.ssh(first, f"touch {buildenv.CUDA_HOME}/bin/gpufleet-probe").returncode != 0, "the toolkit is read-only"
        versions = ok(lab, first, f"{buildenv.VENV_PATH}/bin/python -W ignore -c "
                                  "'import sys, torch; print(sys.executable, torch.__version__, torch.version.cuda)'")
        assert versions.split() == [f"{buildenv.VENV_PATH}/bin/python", lab.build_settings()["torch_version"], "13.0"]
        ok(lab, first, f"echo 'x = 1' > {buildenv.VENV_PATH}/lib/python3.11/site-packages/gpufleet_probe.py")
        assert lab.ssh(second, f"{buildenv.VENV_PATH}/bin/python -c 'import gpufleet_probe'").returncode != 0
        assert not list(buildenv.venv_dir().glob("venv/lib/python3.11/site-packages/gpufleet_probe.py"))
    finally:
        for host in (first, second):
            lab.remove_host(host)


def test_systemd_host_boots_systemd_as_pid_1_confined_like_the_others_and_survives_a_restart(lab: Lab) -> None:
    from gpufleet_lab import hosts, network

    host = lab.add_host(gpu="none", systemd=True)
    try:
        assert ok(lab, host, "cat /proc/1/comm").strip() == "systemd"
        assert ok(lab, host, "systemd-detect-virt --container").strip() == "container-other"
        running = ok(lab, host, "systemctl is-system-running --wait; systemctl is-active ssh.service")
        assert running.split() == ["running", "active"], running
        assert ok(lab, host, "cat /proc/self/cgroup").splitlines()[-1] == "0::/system.slice/ssh.service"
        # The same confinement as an sshd host: no module loading or clock setting, masked and read-only /proc.
        bounding = int(ok(lab, host, "sed -n 's/^CapBnd:[[:space:]]*//p' /proc/1/status"), 16)
        for cap in (16, 25, 17):  # CAP_SYS_MODULE, CAP_SYS_TIME, CAP_SYS_RAWIO
            assert not bounding & (1 << cap), f"capability {cap} is in PID 1's bounding set"
        for masked in ("/proc/sysrq-trigger", "/proc/kcore"):  # where this machine's kernel has them
            if Path(masked).exists():
                assert ok(lab, host, f"stat -c %t:%T {masked}").strip() == "1:3", f"{masked} is not /dev/null"
        assert lab.ssh(host, "echo 1 > /proc/sys/kernel/ns_last_pid").returncode != 0
        own = set(network.netns_pids(host.netns))
        cgroup = hosts.host_cgroup(host.name)
        assert set(map(int, (cgroup / "system.slice/ssh.service/cgroup.procs").read_text().split())) <= own

        ok(lab, host, "echo kept > /root/before-restart")
        first_init = hosts.init_pid(host)
        lab.restart_host(host)
        assert hosts.init_pid(host) not in (None, first_init)
        assert ok(lab, host, "cat /root/before-restart").strip() == "kept"
        assert ok(lab, host, "cut -d' ' -f1 /proc/uptime").strip() == "1.00"
        assert ok(lab, host, "systemctl is-system-running --wait").strip() == "running"
    finally:
        lab.remove_host(host)
    assert not cgroup.exists(), "the host's cgroup outlived it"
    assert host.netns not in network.lab_namespaces()
