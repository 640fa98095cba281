"""`gpufleet rollout`: deploys/full.py across the fleet a batch at a time, each batch health-gated.

A canary first, then batches, each through the real pyinfra CLI (`--limit` names the batch's hosts). A batch passes
when every host in it converged without an error and its smoke result (the health gate) passed; a host that needs a
reboot gpufleet may not do now ("reboot pending") is not done. The first batch with more failed or pending hosts than
--max-failed stops the rollout; the hosts after it are not touched. Running the same command again continues: hosts
already converged have nothing to do and pass their gate again.
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from gpufleet.inventory import Inventory
from gpufleet.report import read_host
from gpufleet.runsummary import RunSummary, RunSummaryError, read_output
from gpufleet.settings import REPO_ROOT, load_settings

DEFAULT_DEPLOY = REPO_ROOT / "deploys" / "full.py"
REBOOT_PENDING = "reboot pending"
# The smoke stage's last operation: its error is the health gate failing (deploys/smoke.py names it so).
SMOKE_CHECK = "Check that every rung of the smoke test passed"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REFUSAL = re.compile(r"^\[(?P<host>[^\]]+)\] gpufleet refuses this host: (?P<reason>.*)$")
_HOST_STATUS = re.compile(r"^\[(?P<host>[^\]]+)\] (?P<status>Success|No changes|Error|Skipped)\b")
_OPERATION = re.compile(r"^--> Starting (?:nested )?operation: (?P<name>.*)$")

# What a host ended as; "todo" hosts were not run (the rollout stopped before their batch).
CONVERGED, UNCHANGED, FAILED, PENDING, TODO = "converged", "skipped", "failed", "pending", "todo"


class RolloutError(Exception):
    """Bad arguments for the rollout (said before any host is touched)."""


@dataclass
class Outcome:
    host: str
    state: str
    detail: str = ""


@dataclass(kw_only=True)
class BatchRun(RunSummary):
    """What one pyinfra run of a batch reported: (from RunSummary) per host its operations' results, and gpufleet's
    refusals from the log."""

    returncode: int
    refusals: dict[str, list[str]] = field(default_factory=dict)


def select_hosts(inventory: Inventory, limit: list[str]) -> list[str]:
    """Workstation and WSL hosts in inventory order, narrowed to `limit` (names, groups or glob patterns of either,
    as pyinfra's --limit takes them). A pattern matching nothing is an error."""
    hosts = [spec for spec in inventory.hosts if spec.group in ("workstations", "wsl")]
    if not limit:
        return _unique(spec.name for spec in hosts)
    chosen = []
    for pattern in limit:
        matched = [spec.name for spec in hosts if fnmatch.fnmatch(spec.name, pattern)
                   or fnmatch.fnmatch(spec.group, pattern)]
        if not matched:
            raise RolloutError(f"--limit {pattern!r} matches no workstation or wsl host of {inventory.path}; "
                               "give a host name, a group (workstations, wsl) or a glob such as 'ws0*'")
        chosen.extend(matched)
    wanted = set(chosen)
    return _unique(spec.name for spec in hosts if spec.name in wanted)


def _unique(names) -> list[str]:
    return list(dict.fromkeys(names))


def plan_batches(hosts: list[str], canary: int, batch: int) -> list[list[str]]:
    """The canary (the first `canary` hosts), then batches of `batch` hosts, in order."""
    if canary < 0 or batch < 1:
        raise RolloutError(f"--canary must be 0 or more and --batch 1 or more (got {canary} and {batch})")
    batches = [hosts[:canary]] if canary and hosts else []
    rest = hosts[canary:]
    batches += [rest[i:i + batch] for i in range(0, len(rest), batch)]
    return batches


def batch_labels(batches: list[list[str]], canary: int) -> list[str]:
    """"canary", "batch 1", "batch 2", ... (no canary: batches from 1)."""
    return ["canary" if canary and i == 0 else f"batch {i if canary else i + 1}" for i in range(len(batches))]


def parse_run(returncode: int, stdout: str, stderr: str) -> BatchRun:
    """pyinfra's --json results (stdout) and its log (stderr): per-host changes, errors and refusals."""
    try:
        summary = read_output(stdout) or RunSummary()
    except RunSummaryError:
        summary = RunSummary()  # no results to read: every host is judged by its refusals or as not converged
    run = BatchRun(hosts=summary.hosts, failed_hosts=summary.failed_hosts, returncode=returncode)
    for line in stderr.splitlines():
        match = _REFUSAL.match(_ANSI.sub("", line).strip())
        if match:
            run.refusals.setdefault(match["host"], []).append(match["reason"])
    return run


def judge(run: BatchRun, hosts: list[str], report_dir: Path) -> list[Outcome]:
    """Each host of the batch: converged (changed and healthy), skipped (nothing to do, healthy), pending (a reboot
    gpufleet may not do now) or failed (an error, a refusal, or a smoke result that is missing or not passed)."""
    outcomes = []
    for host in hosts:
        refusals = run.refusals.get(host, [])
        pending = [r for r in refusals if REBOOT_PENDING in r]
        errors = run.errors(host)
        if pending:
            outcomes.append(Outcome(host, PENDING, pending[0]))
        elif refusals:
            outcomes.append(Outcome(host, FAILED, refusals[0]))
        elif _only_smoke_check(errors) or (not errors and host in run.hosts and host not in run.failed_hosts):
            # The smoke result was fetched in this run, so the local copy is the host's current one.
            outcomes.append(_gate(host, report_dir, changed=bool(run.changes(host))))
        elif errors:
            outcomes.append(Outcome(host, FAILED, f"error in: {errors[0]}"))
        else:
            why = "could not connect" if host in run.failed_hosts else f"pyinfra exited {run.returncode}"
            outcomes.append(Outcome(host, FAILED, f"{why}; see the batch's pyinfra log"))
    return outcomes


def _only_smoke_check(errors: list[str]) -> bool:
    """The host's one error is the smoke stage's check (pyinfra names operations "<deploy> | <name>")."""
    return bool(errors) and all(e.split(" | ")[-1] == SMOKE_CHECK for e in errors)


def _gate(host: str, report_dir: Path, changed: bool) -> Outcome:
    result = read_host(report_dir / f"{host}.json")
    if result is None or result.status == "unreadable":
        return Outcome(host, FAILED, f"health gate: no readable smoke result in {report_dir}")
    if result.status != "passed":
        return Outcome(host, FAILED, f"health gate: smoke test failed at rung {result.failed_rung or '?'}: "
                                     f"{result.message}")
    return Outcome(host, CONVERGED if changed else UNCHANGED, "smoke test passed")


class Progress:
    """One live table: batch, host, the stage pyinfra runs now, and each host's state."""

    def __init__(self, batches: list[list[str]], labels: list[str], console: Console) -> None:
        self.rows = {host: [label, "waiting", TODO] for label, hosts in zip(labels, batches) for host in hosts}
        self.live = Live(self.table(), console=console, refresh_per_second=4, transient=False)

    def table(self) -> Table:
        table = Table(title="gpufleet rollout", expand=False)
        for column in ("batch", "host", "stage", "state"):
            table.add_column(column, overflow="fold")
        for host, (batch, stage, state) in self.rows.items():
            table.add_row(batch, host, stage, state)
        return table

    def update(self, host: str, stage: str | None = None, state: str | None = None) -> None:
        row = self.rows.get(host)
        if row is None:
            return
        row[1] = stage if stage is not None else row[1]
        row[2] = state if state is not None else row[2]
        self.live.update(self.table())


def run_batch(inventory: Path, deploy: Path, hosts: list[str], progress: Progress | None,
              extra: list[str]) -> tuple[BatchRun, str]:
    """One `pyinfra -y --json --limit ...` run from the repository root; the log streams into the progress view."""
    env = {**os.environ, "GPUFLEET_INVENTORY": str(inventory.resolve()),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pyinfra", "-y", "--json", *extra]
    for host in hosts:
        command += ["--limit", host]
    command += [str(REPO_ROOT / "inventory.py"), str(deploy.resolve())]
    log: list[str] = []
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        stage = "connecting"
        for host in hosts:
            if progress:
                progress.update(host, stage, "running")
        for raw in proc.stderr:
            line = _ANSI.sub("", raw).rstrip()
            log.append(line)
            op = _OPERATION.match(line.strip())
            if op:
                stage = op["name"].split(" | ")[0].split(" (")[0]
                for host in hosts:
                    if progress:
                        progress.update(host, stage)
            status = _HOST_STATUS.match(line.strip())
            if status and status["status"] == "Error" and progress:
                progress.update(status["host"], stage, "error")
        proc.wait()
        out.seek(0)
        stdout = out.read()
    return parse_run(proc.returncode, stdout, "\n".join(log)), "\n".join(log)


def summary(outcomes: dict[str, Outcome], order: list[str]) -> Table:
    table = Table(title="rollout summary", expand=False)
    for column in ("host", "result", "detail"):
        table.add_column(column, overflow="fold")
    for host in order:
        outcome = outcomes[host]
        text = {TODO: "still to do", UNCHANGED: "skipped (already converged)"}.get(outcome.state, outcome.state)
        table.add_row(host, text, outcome.detail)
    return table


def counts(outcomes: dict[str, Outcome]) -> dict[str, int]:
    return {state: sum(o.state == state for o in outcomes.values())
            for state in (CONVERGED, UNCHANGED, FAILED, PENDING, TODO)}


def rollout(inventory: Inventory, deploy: Path, canary: int, batch: int, max_failed: int, limit: list[str],
            console: Console, extra: list[str] | None = None) -> int:
    """Run the batches in order; exit 0 when every selected host is converged, 1 when the rollout stopped."""
    if max_failed < 0:
        raise RolloutError(f"--max-failed must be 0 or more (got {max_failed})")
    if not deploy.is_file():
        raise RolloutError(f"deploy file {deploy} does not exist")
    hosts = select_hosts(inventory, limit)
    batches = plan_batches(hosts, canary, batch)
    report_dir = _report_dir(inventory)
    outcomes = {host: Outcome(host, TODO, "not started: an earlier batch stopped the rollout") for host in hosts}
    stopped = None
    labels = batch_labels(batches, canary)
    logs = report_dir.parent / "rollout"
    progress = Progress(batches, labels, console)
    with progress.live:
        for label, members in zip(labels, batches):
            run, log = run_batch(inventory.path, deploy, members, progress, extra or [])
            logs.mkdir(parents=True, exist_ok=True)
            (logs / f"{label.replace(' ', '-')}.log").write_text(log + "\n")
            for outcome in judge(run, members, report_dir):
                outcomes[outcome.host] = outcome
                progress.update(outcome.host, "done" if outcome.state in (CONVERGED, UNCHANGED) else "stopped",
                                outcome.state)
            bad = [outcomes[h] for h in members if outcomes[h].state in (FAILED, PENDING)]
            if len(bad) > max_failed or sum(o.state in (FAILED, PENDING) for o in outcomes.values()) > max_failed:
                stopped = (label, bad)
                break
    console.line()
    console.print(summary(outcomes, hosts))
    tally = counts(outcomes)
    console.print(f"converged {tally[CONVERGED]}, skipped (already converged) {tally[UNCHANGED]}, "
                  f"failed {tally[FAILED]}, reboot pending {tally[PENDING]}, still to do {tally[TODO]}")
    if stopped:
        label, bad = stopped
        console.print(f"[bold red]rollout stopped at the {label}[/]: "
                      + "; ".join(f"{o.host}: {o.detail}" for o in bad))
        console.print(f"pyinfra's log of each batch: {logs}/. Fix the cause, then run the same command again: "
                      "converged hosts are no-ops.")
        return 1
    return 0


def _report_dir(inventory: Inventory) -> Path:
    """Where the smoke stage fetches each host's result (relative report_dir: from the repository root)."""
    default = load_settings()["report_dir"].default
    dirs = {spec.settings.get("report_dir", default) for spec in inventory.hosts}
    if len(dirs) > 1:
        raise RolloutError(f"report_dir differs between hosts in {inventory.path} ({', '.join(sorted(dirs))}); "
                           "the rollout reads every smoke result from one place: set it once for the fleet")
    return REPO_ROOT / dirs.pop() / "latest" if dirs else REPO_ROOT / default / "latest"
