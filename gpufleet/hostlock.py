"""One gpufleet run at a time per host, and per wheel cache and report folder on this machine.

On a host: `flock` on /run/gpufleet.lock, held by a small shell (the holder) that runs on an SSH channel of its own on
this run's connection. It is taken at prepare time, before the deploy reads any fact, so a run never plans from
state another run is changing. It is released when the run's last operation ended (`bye`), or, when the run died,
once the holder sees its channel end (this process died and the kernel closed the socket) or hears no heartbeat for
HOLDER_TIMEOUT_S seconds (the link dropped and sshd has not noticed); then it first stops what the dead run left
running. A later run from this machine ends a holder whose run's process is gone at once. /run/gpufleet.owner names
the holder; each take, refusal and release is logged in /var/log/gpufleet-lock.log.

Hosts reached by other connectors than SSH and @local (docker, chroot, the plan tests' fake one) are not locked.
A reboot (server.reboot) ends the connection, and with it the lock, for the rest of that run.
"""
from __future__ import annotations

import fcntl
import getpass
import os
import re
import shlex
import socket
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS, pop_global_arguments
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.state import BaseStateCallback
from pyinfra.connectors.local import LocalConnector
from pyinfra.connectors.ssh import SSHConnector
from pyinfra.connectors.util import make_unix_command_for_host

from gpufleet.runstate import run_of

LOCK = "/run/gpufleet.lock"
OWNER = "/run/gpufleet.owner"
LOG = "/var/log/gpufleet-lock.log"
HEARTBEAT_S = 15
HOLDER_TIMEOUT_S = 60
HOLDER_NAME = "gpufleet-lock-holder"
_OWNER_LINE = re.compile(r"^(?P<who>\S+)@(?P<machine>\S+) pid (?P<pid>\d+) since (?P<since>\S+) holder (?P<holder>\d+)$")
_SAFE = re.compile(r"[^A-Za-z0-9_.:-]")

# Per pyinfra Host (one object per host and run): the open channel (SSH) or process (@local) holding its lock.
_holders: dict[Any, Any] = {}
_heartbeat: threading.Thread | None = None
# Per control-machine folder: the open, flock-ed lock file.
_control_locks: dict[Path, Any] = {}


def owner_text() -> str:
    """Who this run is, as the lock's owner file records it: user@machine pid N since UTC time (shell-safe)."""
    since = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    user = _SAFE.sub("_", getpass.getuser())
    machine = _SAFE.sub("_", socket.gethostname())
    return f"{user}@{machine} pid {os.getpid()} since {since}"


STAMP = "date -u +%Y-%m-%dT%H:%M:%SZ"
# The holder, run by bash with $1 the owner and $2 the run's SSH_CONNECTION ("" on @local: nothing is stopped).
# It holds fd 9 (the flock) until the run says `bye` after its last operation, or, when the run died, until stdin
# ends, stays silent HOLDER_TIMEOUT_S seconds, or it is sent TERM. A dead run's lock is released only after the
# holder stopped what that run left running (processes of the same SSH connection, which sshd does not end when
# the link dies), so the next run never works beside a dead run's apt or pip. After `bye` nothing is stopped.
HOLD = r"""
owner="$1"; conn="$2"; unset SSH_CONNECTION
finish() {
  trap '' TERM HUP
  if [ -n "$conn" ]; then
    keep=" $$ "; p=$$
    while [ "$p" -gt 1 ] 2>/dev/null; do p=$(sed -n 's/^PPid:[[:space:]]*//p' /proc/$p/status); keep="$keep$p "; done
    pids=""
    for e in /proc/[0-9]*/environ; do
      p=${e#/proc/}; p=${p%/environ}
      case "$keep" in *" $p "*) continue ;; esac
      if tr '\0' '\n' < "$e" 2>/dev/null | grep -qxF "SSH_CONNECTION=$conn"; then pids="$pids $p"; fi
    done
    if [ -n "$pids" ]; then
      kill -TERM $pids 2>/dev/null
      for _ in 1 2 3 4 5 6 7 8 9 10; do
        alive=""; for p in $pids; do if [ -d /proc/$p ]; then alive="$alive $p"; fi; done
        [ -z "$alive" ] && break; sleep 0.5
      done
      [ -n "$alive" ] && kill -KILL $alive 2>/dev/null
      echo "$(STAMP) stopped what the run left running:$pids" >> LOG
    fi
  fi
  echo "$(STAMP) released: $owner" >> LOG
  exit 0
}
trap finish TERM HUP
while read -r -t TIMEOUT line; do
  if [ "$line" = bye ]; then conn=""; break; fi
done
finish
""".replace("STAMP", STAMP).replace("LOG", LOG).replace("TIMEOUT", str(HOLDER_TIMEOUT_S))
# The nearest process up from the script that carries SSH_CONNECTION (sudo clears it from its children).
FIND_CONNECTION = (
    'conn=""; p=$$; while [ -z "$conn" ] && [ "$p" -gt 1 ] 2>/dev/null; do '
    "conn=$(tr '\\0' '\\n' < /proc/$p/environ 2>/dev/null | sed -n 's/^SSH_CONNECTION=//p'); "
    "p=$(sed -n 's/^PPid:[[:space:]]*//p' /proc/$p/status); done; "
)


def holder_script(owner: str, wait_s: int, over_ssh: bool = True) -> str:
    """Shell that takes the lock within wait_s seconds (printing `taken`) and then holds it (HOLD); or prints
    `held: <owner file>` and exits 75."""
    return (
        f"exec 9>>{LOCK} || exit 70; "
        f"if ! flock -w {int(wait_s)} 9; then "
        f'echo "held: $(cat {OWNER} 2>/dev/null)"; echo "$({STAMP}) busy, refused: {owner}" >> {LOG}; exit 75; fi; '
        + (FIND_CONNECTION if over_ssh else 'conn=""; ')
        + f'echo "{owner} holder $$" > {OWNER}; echo "$({STAMP}) taken: {owner} holder $$" >> {LOG}; echo taken; '
        f'exec bash -c {shlex.quote(HOLD)} {HOLDER_NAME} {shlex.quote(owner)} "$conn"'
    )


def takeover_script(holder_pid: int) -> str:
    """Shell that ends a holder whose run is gone (only if that PID still is a gpufleet lock holder)."""
    return (
        f"if tr '\\0' ' ' < /proc/{holder_pid}/cmdline 2>/dev/null | grep -q {HOLDER_NAME}; then "
        f"kill {holder_pid}; echo \"$({STAMP}) stale holder {holder_pid} ended\" >> {LOG}; fi"
    )


def parse_owner(text: str) -> dict[str, str] | None:
    match = _OWNER_LINE.match(text.strip())
    return match.groupdict() if match else None


def _run_is_gone(owner: dict[str, str]) -> bool:
    """The owner's run ran on this machine and its process no longer exists."""
    if owner["machine"] != _SAFE.sub("_", socket.gethostname()):
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _unix_command(state, host, script: str) -> str:
    """The script as pyinfra would run it on this host (sudo/su from the inventory applied)."""
    global_kwargs, _ = pop_global_arguments(state, host, {})
    skip = ("_success_exit_codes", "_timeout", "_get_pty", "_stdin")
    executor = {k: v for k, v in global_kwargs.items() if k in CONNECTOR_ARGUMENT_KEYS and k not in skip}
    return make_unix_command_for_host(state, host, script, **executor).get_raw_value()


def _start(state, host, script: str) -> tuple[Any, Any]:
    """Start script on the host on a channel of its own; return (handle, line reader)."""
    command = _unix_command(state, host, script)
    if isinstance(host.connector, SSHConnector):
        channel = host.connector.client.get_transport().open_session()
        channel.exec_command(command)
        return channel, channel.makefile("r")
    proc = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout


def _close(handle: Any) -> None:
    if isinstance(handle, subprocess.Popen):
        handle.stdin.close()
        handle.wait(timeout=10)
    else:
        handle.close()


def _beat() -> None:
    """Every HEARTBEAT_S seconds, a line to every holder: silence longer than HOLDER_TIMEOUT_S releases a lock."""
    while True:
        time.sleep(HEARTBEAT_S)
        for handle in list(_holders.values()):
            try:
                if isinstance(handle, subprocess.Popen):
                    handle.stdin.write("\n")
                    handle.stdin.flush()
                else:
                    handle.sendall(b"\n")
            except (OSError, EOFError, ValueError):
                continue


class _ReleaseAfterTheLastOperation(BaseStateCallback):
    """Says `bye` to every holder once the run's last operation ended: the normal release."""

    @staticmethod
    def operation_end(state, op_hash) -> None:
        order = state.get_op_order()
        if order and op_hash == order[-1]:
            release_all()


def release_all() -> None:
    """Release every host lock of this run, telling each holder the run ended normally."""
    for held, handle in list(_holders.items()):
        try:
            if isinstance(handle, subprocess.Popen):
                handle.stdin.write("bye\n")
                handle.stdin.flush()
            else:
                handle.sendall(b"bye\n")
                handle.shutdown_write()
        except (OSError, EOFError, ValueError):
            pass
        del _holders[held]


def lock_host(state, host, wait_s: int) -> str | None:
    """Take the host's lock for the rest of this run; None when taken (or the connector cannot be locked), else why
    not, naming the run that holds it."""
    global _heartbeat
    # The Host itself, not pyinfra's context proxy for the current host: a key that stays this host of this run.
    host = host.connector.host
    if host in _holders:
        return None
    if not isinstance(host.connector, (SSHConnector, LocalConnector)):
        return None
    owner = owner_text()
    for attempt in (1, 2):
        # After ending a stale holder, a few seconds for it to exit and its lock to fall.
        wait = wait_s if attempt == 1 else max(wait_s, 20)
        script = holder_script(owner, wait, over_ssh=isinstance(host.connector, SSHConnector))
        handle, lines = _start(state, host, script)
        first = lines.readline().strip()
        if first == "taken":
            _holders[host] = handle
            if _heartbeat is None:
                _heartbeat = threading.Thread(target=_beat, name="gpufleet-lock-heartbeat", daemon=True)
                _heartbeat.start()
            # Once per run: a second run in this process releases its locks at its own end too.
            if run_of(host.state).first_time("release host locks after the last operation"):
                state.add_callback_handler(_ReleaseAfterTheLastOperation())
            return None
        _close(handle)
        held_by = parse_owner(first.removeprefix("held:").strip())
        if attempt == 1 and held_by and _run_is_gone(held_by):
            handle, lines = _start(state, host, takeover_script(int(held_by["holder"])))
            lines.read()
            _close(handle)
            continue
        break
    if not first.startswith("held:"):
        return f"cannot take the gpufleet lock {LOCK} (flock and bash are needed on the host): {first or 'no output'}"
    who = (
        f"{held_by['who']} from {held_by['machine']} (pid {held_by['pid']}) since {held_by['since']}"
        if held_by else "a run that left no owner record"
    )
    waited = f" after waiting {wait_s} s" if wait_s else ""
    return (
        f"another gpufleet run holds this host{waited}: {who} ({OWNER}). Let it finish and run again, or set "
        "lock_timeout to wait for it."
    )


def lock_control_folder(folder: Path, wait_s: int) -> None:
    """Hold a file lock on a folder of this machine (wheel cache, reports) for the rest of this run; raise a
    PyinfraError naming the other run when it is held past wait_s."""
    folder = folder.resolve()
    if folder in _control_locks:
        return
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".gpufleet.lock", "a+")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.seek(0)
                holder = handle.read().strip() or "another gpufleet run"
                handle.close()
                raise PyinfraError(
                    f"{folder} is in use by {holder}; let that run finish, or set lock_timeout to wait for it."
                ) from None
            time.sleep(0.5)
    handle.seek(0)
    handle.truncate()
    handle.write(owner_text() + "\n")
    handle.flush()
    _control_locks[folder] = handle
