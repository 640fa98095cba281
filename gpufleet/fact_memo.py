"""Each fact read once per host per run: pyinfra 3 keeps no fact cache, so every host.get_fact is a round trip.

pyinfra 3 runs an operation's body when it executes it and, unless run with -y, once before, while it prepares the
run, to show what would change; each time the body reads its facts. An answer stays true until something
changes the host, so it is kept while nothing has: through the preparation (no operation has run yet), and while
executing until an operation on that host runs a command. The operation being executed counts as changing when its
preparation planned commands or did not look (`pyinfra -y` skips that look), since a read inside it may follow one
of its commands; a caller that reads before its operation yields anything says so with before_commands=True.
"""

from __future__ import annotations

from typing import Any, TypeVar

from gevent.event import AsyncResult
from pyinfra.api import FactBase
from pyinfra.api.host import Host
from pyinfra.api.state import State, StateStage
from pyinfra.context import ctx_state

from gpufleet.runstate import run_of

T = TypeVar("T")


def unchanged_since_prepare(run: State, target: Host, before_commands: bool = False) -> bool:
    """True while no operation on target has run a command in this run, and the one running now planned none (or,
    before_commands, has yielded none yet)."""
    if run.current_stage == StateStage.Prepare:
        return True
    for op_hash, data in run.ops.get(target, {}).items():
        meta = data.operation_meta
        if meta.is_complete():
            if meta.executed:
                return False
        # pyinfra keeps the preparation's verdict in _maybe_is_change; None (not checked) counts as a change.
        elif (op_hash == target.current_op_hash and not before_commands
              and getattr(meta, "_maybe_is_change", None) is not False):
            return False
    return True


def fact(target: Host, cls: type[FactBase[T]], before_commands: bool = False, **kwargs: Any) -> T:
    """target.get_fact(cls, **kwargs), fetched once per host, fact and arguments while the host is unchanged.

    before_commands: the caller is an operation's body that has yielded no command yet.
    """
    run = ctx_state.get()
    if run is None or not unchanged_since_prepare(run, target, before_commands):
        return target.get_fact(cls, **kwargs)
    # Per run (gpufleet.runstate). Hosts are prepared in parallel greenlets and read each other's facts
    # (xformers_fleet), so a second reader waits for the first.
    answers = run_of(run).fact_answers
    key = (target.name, cls, repr(sorted(kwargs.items())))
    if key in answers:
        return answers[key].get()
    answer = answers[key] = AsyncResult()
    try:
        answer.set(target.get_fact(cls, **kwargs))
    except Exception as error:
        answer.set_exception(error)
        raise
    return answer.get()
