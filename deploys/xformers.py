"""Stage 5, xformers: xformers built from source, once per fleet.

Runs alone (after preflight): pyinfra inventory.py deploys/xformers.py
"""

from pyinfra.api import deploy

from deploys.preflight import preflight
from gpufleet.stage import not_implemented, run_alone


@deploy("xformers built from source, once per fleet")
def xformers() -> None:
    not_implemented("xformers", issue=5)


run_alone(__file__, preflight, xformers)
