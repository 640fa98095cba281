"""Two of pyinfra 3's per-call costs, paid again for every operation and fact on every host, made once.

At 24 hosts most of a no-op run's controller CPU went to two helpers (cProfile of benchmarks/rerun.py's deploy):
- `all_global_arguments()` evaluates the type hints of pyinfra's argument classes on every call, and
  `pop_global_arguments` calls it for each operation and each fact, on each host. The hints are fixed when pyinfra
  is imported, so they are computed once.
- `get_operation_order_from_stack()` builds `inspect.stack()` for each operation call, which reads the source line
  of every frame from disk, then uses only each frame's file name and line number. The same walk over the frames
  without the source gives the same order.
install() replaces both where pyinfra looks them up; the answers are the same (tests/unit/test_pyinfra_speed.py).
"""

from __future__ import annotations

import functools
import importlib
import sys
from types import FrameType
from typing import Any

import pyinfra
from pyinfra.api import arguments, facts, util
from pyinfra.api.state import State

# pyinfra.api's `operation` is the decorator; the module that calls get_operation_order_from_stack is this one.
_operation_module = importlib.import_module("pyinfra.api.operation")

_ORIGINAL_ALL_GLOBAL_ARGUMENTS = arguments.all_global_arguments
_ORIGINAL_OPERATION_ORDER = util.get_operation_order_from_stack


@functools.cache
def _global_arguments() -> tuple[tuple[str, Any], ...]:
    return tuple(_ORIGINAL_ALL_GLOBAL_ARGUMENTS())


def all_global_arguments() -> list[tuple[str, type]]:
    """pyinfra's all_global_arguments(), from hints read once."""
    return list(_global_arguments())


def _frames_outermost_first(innermost: FrameType | None) -> list[FrameType]:
    frames = []
    while innermost is not None:
        frames.append(innermost)
        innermost = innermost.f_back
    frames.reverse()
    return frames


def get_operation_order_from_stack(state: State) -> list[int]:
    """pyinfra's get_operation_order_from_stack(): the line numbers from the deploy file down to the operation."""
    # inspect.stack() there starts at pyinfra's own frame, which it skips; this walk starts at the caller's (pyinfra's
    # operation wrapper, skipped the same way), so this function's frame is never counted.
    frames = _frames_outermost_first(sys._getframe(1))
    i = 0
    if state.current_deploy_filename:
        # From the first frame of the deploy file; none (pyinfra's loop ends on its own, skipped, frame): no lines.
        i = next((n for n, frame in enumerate(frames) if frame.f_code.co_filename == state.current_deploy_filename),
                 len(frames))
    line_numbers = [state.current_op_file_number] if pyinfra.is_cli else []
    for frame in frames[i:]:
        if frame.f_code.co_filename.startswith(util.PYINFRA_INSTALL_DIR):
            continue
        line_numbers.append(frame.f_lineno)
    return line_numbers


def install() -> None:
    """Points pyinfra's modules at the functions above (idempotent)."""
    arguments.all_global_arguments = all_global_arguments
    facts.all_global_arguments = all_global_arguments  # type: ignore[attr-defined]
    _operation_module.get_operation_order_from_stack = get_operation_order_from_stack
