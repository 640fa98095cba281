"""Stage 4, torch: PyTorch, pinned fleet-wide.

Runs alone (after preflight): pyinfra inventory.py deploys/torch.py
"""

from pyinfra.api import deploy

from deploys.preflight import preflight
from gpufleet.stage import not_implemented, run_alone


@deploy("PyTorch, pinned fleet-wide")
def torch() -> None:
    not_implemented("torch", issue=5)


run_alone(__file__, preflight, torch)
