"""Every stage in order, from a fresh host to a proven one: pyinfra inventory.py deploys/full.py

Why this order, and why each stage is called on its own line: gpufleet/stage.py (its docstring).
"""

from deploys.cache import fleet_cache
from deploys.cuda import cuda
from deploys.driver import driver
from deploys.preflight import preflight
from deploys.python import python
from deploys.smoke import smoke
from deploys.torch import torch
from deploys.xformers import xformers
from gpufleet.nvidia_repo import repair_interrupted_packages
from gpufleet.stage import cache_only, refused, skip_remaining_stages, stopped, take_host_lock

take_host_lock()
# A host that only serves the fleet cache needs no GPU to pass preflight.
if not cache_only() and not refused():
    preflight()
# On every host, whether or not a stage uses apt this run.
if not refused():
    repair_interrupted_packages()
# On one line for every host: every later apt and pip use goes through the cache.
if not refused():
    fleet_cache()
# A host that only serves the cache stops here, not refused: the stages below skip any stopped host.
if cache_only():
    skip_remaining_stages()
if not stopped():
    driver()
if not stopped():
    cuda()
if not stopped():
    python()
if not stopped():
    torch()
if not stopped():
    xformers()
if not stopped():
    smoke()
