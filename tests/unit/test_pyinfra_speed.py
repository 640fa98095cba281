"""gpufleet.pyinfra_speed gives the answers of the pyinfra helpers it replaces: the same global arguments, and the
same operation order from the same stack (the order decides each operation's identity across hosts)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pyinfra
import pytest
from pyinfra.api import arguments, util

from gpufleet import fact_memo, pyinfra_speed


def test_global_arguments_are_pyinfras_own() -> None:
    fact_memo.install()
    assert pyinfra_speed.all_global_arguments() == pyinfra_speed._ORIGINAL_ALL_GLOBAL_ARGUMENTS()
    assert arguments.all_global_arguments is pyinfra_speed.all_global_arguments


def test_callers_cannot_change_the_kept_global_arguments() -> None:
    pyinfra_speed.all_global_arguments().clear()
    assert pyinfra_speed.all_global_arguments() == pyinfra_speed._ORIGINAL_ALL_GLOBAL_ARGUMENTS()


def nested(depth: int, state: SimpleNamespace) -> tuple[list[int], list[int]]:
    """Both helpers called from one line, `depth` calls below the test, so they see the same stack."""
    if depth:
        return nested(depth - 1, state)
    return pyinfra_speed.get_operation_order_from_stack(state), pyinfra_speed._ORIGINAL_OPERATION_ORDER(state)


@pytest.mark.parametrize("deploy_file", [__file__, "", str(Path(__file__).with_name("not_on_the_stack.py"))])
@pytest.mark.parametrize("is_cli", [True, False])
@pytest.mark.parametrize("depth", [0, 3])
def test_operation_order_is_pyinfras_own(monkeypatch: pytest.MonkeyPatch, deploy_file: str, is_cli: bool,
                                         depth: int) -> None:
    monkeypatch.setattr(pyinfra, "is_cli", is_cli)
    state = SimpleNamespace(current_deploy_filename=deploy_file, current_op_file_number=7)
    ours, theirs = nested(depth, state)
    assert ours == theirs
    # The deploy file's frames are counted, down to the call: more frames, more line numbers.
    if deploy_file == __file__:
        assert len(ours) == (1 if is_cli else 0) + 2 + depth


def test_gpufleet_has_pyinfra_call_the_faster_operation_order() -> None:
    import importlib
    fact_memo.install()
    assert importlib.import_module("pyinfra.api.operation").get_operation_order_from_stack is \
        pyinfra_speed.get_operation_order_from_stack
    assert util.get_operation_order_from_stack is pyinfra_speed._ORIGINAL_OPERATION_ORDER
