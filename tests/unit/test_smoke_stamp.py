"""When the smoke test runs again: its stamp is a function of settings and, on WSL2, of the Windows driver."""

from __future__ import annotations

from dataclasses import replace

from gpufleet.decide import smoke_stamp, windows_driver
from gpufleet.facts import SmiGpu, SmiResult
from gpufleet.settings import load_settings
from tests.unit.test_decide import wsl_with_windows_driver, workstation

CONFIG = {name: setting.default for name, setting in load_settings().items()}


def test_same_settings_and_windows_driver_give_the_same_stamp_so_a_rerun_tests_nothing():
    host = wsl_with_windows_driver("581.57")
    assert smoke_stamp(CONFIG, windows_driver(host)) == smoke_stamp(CONFIG, windows_driver(host))


def test_a_windows_driver_update_gives_a_new_stamp_so_the_smoke_test_runs_again():
    before = smoke_stamp(CONFIG, windows_driver(wsl_with_windows_driver("581.57")))
    after = smoke_stamp(CONFIG, windows_driver(wsl_with_windows_driver("591.44")))
    assert before != after


def test_bare_metal_stamp_ignores_what_nvidia_smi_reports():
    # There the driver changes only through gpufleet's install or a reboot, which stack_changed() sees in the run.
    host = workstation(smi=SmiResult(True, (SmiGpu("NVIDIA GeForce RTX 5090 D", "2b87", "12.0", "580.95.05"),)))
    assert windows_driver(host) is None
    assert smoke_stamp(CONFIG, windows_driver(host)) == smoke_stamp(CONFIG)


def test_wsl_host_whose_nvidia_smi_shows_no_gpu_has_no_windows_driver_in_its_stamp():
    assert windows_driver(replace(wsl_with_windows_driver("581.57"), smi=SmiResult(True, ()))) is None


def test_a_settings_change_still_gives_a_new_stamp_on_wsl():
    driver = windows_driver(wsl_with_windows_driver("581.57"))
    assert smoke_stamp(CONFIG, driver) != smoke_stamp({**CONFIG, "smoke_heads": 16}, driver)
