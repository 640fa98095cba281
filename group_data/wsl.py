"""Overrides for hosts in the `wsl` group: Ubuntu 24.04 under WSL2, whose driver lives on Windows."""

# WSL has no kernel of its own to reboot; the driver is updated from Windows.
reboot_policy = "never"
# Nothing to hold inside WSL: no driver package is ever installed there.
hold_driver_updates = False
