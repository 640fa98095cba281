"""The real stages from preflight to xformers (deploys/full.py without the fleet cache and the smoke test, which
needs a GPU): the deploy benchmarks/rerun.py times and tests/lab/test_rerun.py counts on lab hosts.
pyinfra inventory.py tests/lab/deploys/stages_to_xformers.py
"""

from deploys.cuda import cuda
from deploys.driver import driver
from deploys.preflight import preflight
from deploys.python import python
from deploys.torch import torch
from deploys.xformers import xformers
from gpufleet.stage import refused

preflight()
if not refused():
    driver()
if not refused():
    cuda()
if not refused():
    python()
if not refused():
    torch()
if not refused():
    xformers()
