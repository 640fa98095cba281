"""Each fact read once per host per run: pyinfra 3 keeps no fact cache, so every host.get_fact is a round trip.

While pyinfra prepares (runs the deploy code) no operation has executed yet, so a fact's answer cannot change
between two reads: the first answer is kept for the rest of the preparation. From the execute phase on (an `_if`
callable, a FunctionCommand) a read goes to the host again, since the operations before it may have changed it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from gevent.event import AsyncResult
from pyinfra import state
from pyinfra.api import FactBase
from pyinfra.api.host import Host
from pyinfra.api.state import StateStage

from gpufleet.runstate import this_run

T = TypeVar("T")


def fact(target: Host, cls: type[FactBase[T]], **kwargs: Any) -> T:
    """target.get_fact(cls, **kwargs), fetched once per host, fact and arguments while the run is prepared."""
    if state.current_stage != StateStage.Prepare:
        return target.get_fact(cls, **kwargs)
    # Per run (gpufleet.runstate). Hosts are prepared in parallel greenlets and read each other's facts
    # (xformers_fleet), so a second reader waits for the first.
    answers = this_run().fact_answers
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
