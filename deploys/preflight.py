"""Stage 0, preflight: refuse a host that cannot be provisioned, saying why and what to do, before any change.

Runs alone: pyinfra inventory.py deploys/preflight.py
"""

from pyinfra.api import deploy

from gpufleet.decide import preflight_problems
from gpufleet.stage import profile, refuse_host, run_alone, settings


@deploy("Preflight")
def preflight() -> None:
    problems = preflight_problems(profile(), settings())
    if problems:
        refuse_host(problems)


run_alone(__file__, preflight)
