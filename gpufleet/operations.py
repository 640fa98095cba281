"""gpufleet's own pyinfra operations. Each docstring says what makes it a no-op."""

from __future__ import annotations

import shlex

from pyinfra.api import operation


@operation(is_idempotent=False)
def refuse(reasons: list[str]):
    """Fail this host with the reasons on stderr. Never a no-op: it exists to stop the host."""
    text = "\n".join(f"gpufleet refuses this host: {r}" for r in reasons)
    yield f"echo {shlex.quote(text)} >&2; exit 1"
