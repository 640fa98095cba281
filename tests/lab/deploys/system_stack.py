"""Preflight, driver, CUDA and Python, as deploys/full.py runs them (the stages whose hosts need no real GPU)."""

from deploys.cuda import cuda
from deploys.driver import driver
from deploys.preflight import preflight
from deploys.python import python
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
