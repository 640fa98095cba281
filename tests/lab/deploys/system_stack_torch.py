"""The system stack (system_stack.py) and then torch, as deploys/full.py runs them (torch is a STAND-IN wheel)."""

from deploys.cuda import cuda
from deploys.driver import driver
from deploys.preflight import preflight
from deploys.python import python
from deploys.torch import torch
from gpufleet.nvidia_repo import repair_interrupted_packages
from gpufleet.stage import refused, take_host_lock

take_host_lock()
if not refused():
    preflight()
if not refused():
    repair_interrupted_packages()
if not refused():
    driver()
if not refused():
    cuda()
if not refused():
    python()
if not refused():
    torch()
