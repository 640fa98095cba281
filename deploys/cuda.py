"""Stage 2, cuda: CUDA toolkit.

Runs alone (after preflight): pyinfra inventory.py deploys/cuda.py
"""

from pyinfra.api import deploy

from deploys.preflight import preflight
from gpufleet.stage import not_implemented, run_alone


@deploy("CUDA toolkit")
def cuda() -> None:
    not_implemented("cuda", issue=4)


run_alone(__file__, preflight, cuda)
