"""Every stage in order, from a fresh host to a proven one: pyinfra inventory.py deploys/full.py"""

from deploys.cuda import cuda
from deploys.driver import driver
from deploys.preflight import preflight
from deploys.python import python
from deploys.smoke import smoke
from deploys.torch import torch
from deploys.xformers import xformers
from gpufleet.stage import refused

for stage in (preflight, driver, cuda, python, torch, xformers, smoke):
    if refused():
        break
    stage()
