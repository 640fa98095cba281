"""Stage 3, python: Python venv for the build user.

Runs alone (after preflight): pyinfra inventory.py deploys/python.py
"""

from pyinfra.api import deploy

from deploys.preflight import preflight
from gpufleet.stage import not_implemented, run_alone


@deploy("Python venv for the build user")
def python() -> None:
    not_implemented("python", issue=4)


run_alone(__file__, preflight, python)
