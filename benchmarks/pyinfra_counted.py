"""`python -m pyinfra` with counters: every command and file transfer sent to a host, and the time each fact and
each operation took, written as JSON to $GPUFLEET_PYINFRA_STATS when the run ends (benchmarks/rerun.py reads it).

Usage: GPUFLEET_PYINFRA_STATS=stats.json python benchmarks/pyinfra_counted.py -y inventory.py deploy.py
"""

import atexit
import json
import os
import time
from collections import Counter, defaultdict

from pyinfra.api import facts, host, operations
from pyinfra_cli.main import main

commands: Counter = Counter()
seconds: dict[str, float] = defaultdict(float)
calls: Counter = Counter()


def _count(method_name: str) -> None:
    original = getattr(host.Host, method_name)

    def counted(self, *args, **kwargs):
        commands[self.name] += 1
        return original(self, *args, **kwargs)

    setattr(host.Host, method_name, counted)


def _time(module, function_name: str, label) -> None:
    original = getattr(module, function_name)

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            key = label(*args, **kwargs)
            seconds[key] += time.perf_counter() - started
            calls[key] += 1

    setattr(module, function_name, timed)


def _write() -> None:
    path = os.environ.get("GPUFLEET_PYINFRA_STATS")
    if path:
        with open(path, "w") as f:
            json.dump({"commands": commands, "seconds": seconds, "calls": calls}, f)


for name in ("run_shell_command", "put_file", "get_file"):
    _count(name)
_time(facts, "_get_fact", lambda state, host_, cls, *a, **k: f"fact {cls.__name__}")
_time(operations, "_run_host_op",
      lambda state, host_, op_hash: "op " + " | ".join(state.get_op_meta(op_hash).names))
atexit.register(_write)

if __name__ == "__main__":
    main()
