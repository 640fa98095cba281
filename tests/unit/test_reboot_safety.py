"""Safe reboots and branch changes: who is using the GPU or the host, and when a branch changes (pure decisions)."""

from gpufleet.decide import branch_change, busy_reasons
from gpufleet.facts import BusyState, GpuBusy, GpuUser, parse_busy

SMI_APPS = "4242, /usr/bin/python3\n5120, /opt/conda/bin/torchrun\n"
WHO = ("alice    pts/0        2026-12-02 09:14 (192.0.2.50)\n"
       "alice    pts/1        2026-12-02 09:20 (192.0.2.50)\n"
       "bob      tty2         2026-12-02 08:01 (tty2)\n")


def test_busy_state_reads_nvidia_smi_compute_apps_uvm_holders_and_who():
    text = f"== apps\n{SMI_APPS}== uvm\n4242 python3\n7001 jupyter-lab\n== who\n{WHO}"
    busy = parse_busy(text)
    assert busy.compute == [GpuUser("4242", "python3"), GpuUser("5120", "torchrun"), GpuUser("7001", "jupyter-lab")]
    assert busy.users == ["alice", "bob"]


def test_an_idle_host_and_a_failing_nvidia_smi_read_as_nothing_running():
    assert parse_busy("== apps\n== uvm\n== who\n") == BusyState([], [])
    # During a driver/library mismatch nvidia-smi prints its error, not CSV: only /dev/nvidia-uvm holders count then.
    text = "== apps\nFailed to initialize NVML: Driver/library version mismatch\n== uvm\n99 python\n== who\n"
    assert parse_busy(text).compute == [GpuUser("99", "python")]


def test_busy_fact_asks_nvidia_smi_for_compute_apps_and_who():
    command = GpuBusy().command()
    assert "nvidia-smi --query-compute-apps=pid,process_name --format=csv,noheader" in command
    assert "/dev/nvidia-uvm" in command and "who" in command


def test_busy_reasons_name_processes_and_users_unless_reboot_when_busy():
    busy = BusyState([GpuUser("4242", "python3")], ["alice"])
    assert busy_reasons(busy, {"reboot_when_busy": False}) == [
        "GPU compute processes: python3 (pid 4242)", "users logged in: alice"]
    assert busy_reasons(busy, {"reboot_when_busy": True}) == []
    assert busy_reasons(BusyState([], []), {"reboot_when_busy": False}) == []


def test_branch_change_is_a_driver_installed_without_the_wanted_packages():
    old = {"nvidia-open-580": "580.95.05-1", "nvidia-dkms-580-open": "580.95.05-1", "cuda-keyring": "1.1-1"}
    assert branch_change(old, ["nvidia-driver-pinning-595", "nvidia-open"])
    new = {"nvidia-driver-pinning-595": "595.45.04-1", "nvidia-open": "595.45.04-1"}
    assert not branch_change(new, ["nvidia-driver-pinning-595", "nvidia-open"])
    assert not branch_change({"cuda-keyring": "1.1-1"}, ["nvidia-open-580"]), "a first install is no branch change"


def test_a_branch_change_runs_the_smoke_test_again_but_does_not_rebuild_xformers():
    from dataclasses import fields

    from gpufleet.decide import smoke_stamp
    from gpufleet.fingerprint import WheelInputs
    from gpufleet.settings import load_settings

    config = {name: setting.default for name, setting in load_settings().items()}
    assert smoke_stamp({**config, "driver_branch": "595"}) != smoke_stamp(config)
    # The wheel's fingerprint has no driver in it: torch, CUDA, Python, the arch list and the sources only.
    assert not [f.name for f in fields(WheelInputs) if "driver" in f.name]
