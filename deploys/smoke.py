"""Stage 6, smoke: Smoke test on the host's GPU and the fleet report.

Runs alone (after preflight): pyinfra inventory.py deploys/smoke.py
"""

from pyinfra.api import deploy

from deploys.preflight import preflight
from gpufleet.stage import not_implemented, run_alone


@deploy("Smoke test on the host's GPU and the fleet report")
def smoke() -> None:
    not_implemented("smoke", issue=6)


run_alone(__file__, preflight, smoke)
