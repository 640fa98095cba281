"""pyinfra inventory: the hosts of inventory/hosts.yaml (or $GPUFLEET_INVENTORY), validated before any connection."""

from gpufleet.inventory import load_inventory_or_exit as _load

_inventory = _load()

# One pyinfra group per gpufleet group (gpufleet.inventory.GROUPS).
workstations = _inventory.group("workstations")
wsl = _inventory.group("wsl")
# The fleet cache host (deploys/cache.py); a workstation that serves the cache is in both groups.
cache = _inventory.group("cache")
