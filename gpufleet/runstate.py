"""What one pyinfra run remembers while it prepares its hosts: one RunState per pyinfra State.

Keyed by the State object, never by host name alone, so two runs through pyinfra's API in one process (tests,
a program driving pyinfra) each start with nothing refused, nothing planned and no report registered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

from gevent.event import AsyncResult
from pyinfra.api.state import State
from pyinfra.context import ctx_state

# Why later stages plan nothing for a host (RunState.stopped).
REFUSED = "refused"
CACHE_ONLY = "serves only the fleet cache"


@dataclass
class RunState:
    # Host name -> why later stages plan nothing for it (REFUSED or CACHE_ONLY).
    stopped: dict[str, str] = field(default_factory=dict)
    # Host name -> the operations whose change means the GPU stack is new and must be tested again.
    stack_changes: dict[str, list[Any]] = field(default_factory=dict)
    # (step, host name) done once: steps stages share (NVIDIA's repository), run-wide ones under host "" (a warning).
    planned: set[tuple[str, str]] = field(default_factory=set)
    # The fleet report's callback is registered once per run.
    report_registered: bool = False
    # This run's folder name under <report_dir>/history, the same for every host.
    history_run_name: str | None = None
    # (host name, fact, arguments) -> answer, kept while the host is unchanged in this run (gpufleet.fact_memo).
    fact_answers: dict[tuple[str, type, str, str], AsyncResult] = field(default_factory=dict)
    # Host name -> questions noted in advance, asked together with the first that must go to the host.
    fact_expected: dict[str, dict[tuple[type, str], dict[str, Any]]] = field(default_factory=dict)
    # pop_global_arguments' inputs -> the arguments that decide how a fact's command runs (gpufleet.fact_memo).
    how_to_run: dict[tuple[str, int, str, str, str], str] = field(default_factory=dict)
    # Hosts on which an operation has run a command in this run: their earlier answers are stale.
    changed_hosts: set[str] = field(default_factory=set)

    def first_time(self, step: str, host_name: str = "") -> bool:
        """True the first time a step is asked for on this host (or, without one, anywhere) in this run."""
        key = (step, host_name)
        if key in self.planned:
            return False
        self.planned.add(key)
        return True


_runs: WeakKeyDictionary[State, RunState] = WeakKeyDictionary()


def run_of(state: State) -> RunState:
    """The RunState of this pyinfra State, made on first use."""
    run = _runs.get(state)
    if run is None:
        run = _runs[state] = RunState()
    return run


def this_run() -> RunState:
    """The RunState of the pyinfra State in context (the run being prepared)."""
    current = ctx_state.get()
    if current is None:
        raise RuntimeError("gpufleet's run state is asked for outside a pyinfra run (no pyinfra State in context)")
    return run_of(current)
