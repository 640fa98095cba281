"""Stage 1, driver: NVIDIA driver (open kernel modules), pinned and held.

Runs alone (after preflight): pyinfra inventory.py deploys/driver.py
"""

from pyinfra.api import deploy

from deploys.preflight import preflight
from gpufleet.stage import not_implemented, run_alone


@deploy("NVIDIA driver (open kernel modules), pinned and held")
def driver() -> None:
    not_implemented("driver", issue=4)


run_alone(__file__, preflight, driver)
