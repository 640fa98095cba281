"""Run the real `pyinfra -y --json` CLI against lab hosts and read its per-host, per-operation results."""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from gpufleet.runsummary import RunSummary, RunSummaryError, load_output, summarise

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(kw_only=True)
class PyinfraRun(RunSummary):
    """One pyinfra run: its command and output, and (from RunSummary) each host's operation results."""

    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    payload: dict | None

    def explain(self) -> str:
        return f"$ {' '.join(self.command)}\nexit {self.returncode}\n--- stderr (tail) ---\n{self.stderr[-4000:]}"

    def assert_converged(self, hosts: list[str]) -> None:
        """Every named host ran every operation without an error (a host may have had none to run, e.g. a stage
        with nothing left to do, as long as pyinfra prepared its deploy)."""
        assert self.payload is not None and self.payload.get("results"), f"no JSON results\n{self.explain()}"
        for host in hosts:
            prepared = any(line.strip().startswith(f"[{host}] Ready:") for line in self.stderr.splitlines())
            assert host in self.hosts or prepared, f"{host} ran no operations\n{self.explain()}"
            assert host not in self.failed_hosts, f"{host} failed\n{self.explain()}"
            assert not self.errors(host), f"{host}: errors in {self.errors(host)}\n{self.explain()}"

    def assert_no_changes(self, hosts: list[str]) -> None:
        """The run converged and changed nothing on any named host (the idempotence check)."""
        self.assert_converged(hosts)
        changed = {host: self.changes(host) for host in hosts if self.changes(host)}
        assert not changed, f"a re-run changed something: {changed}\n{self.explain()}"


def parse(command: list[str], proc: subprocess.CompletedProcess[str]) -> PyinfraRun:
    try:
        payload = load_output(proc.stdout)
        summary = summarise(payload) if payload is not None else RunSummary()
    except RunSummaryError:
        # Something besides pyinfra's JSON on stdout: no results; stdout and stderr stay for the message.
        payload, summary = None, RunSummary()
    return PyinfraRun(hosts=summary.hosts, failed_hosts=summary.failed_hosts, command=command,
                      returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr, payload=payload)


def pyinfra_command(inventory: Path, deploy: str | Path, *extra: str) -> tuple[list[str], dict[str, str]]:
    """The `pyinfra -y --json` command line and environment run_pyinfra uses (for a run a test kills itself)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    target = str(inventory)
    if Path(inventory).suffix in (".yaml", ".yml"):
        env["GPUFLEET_INVENTORY"] = str(inventory)
        target = "inventory.py"
    return [sys.executable, "-m", "pyinfra", "-y", "--json", *extra, target, str(deploy)], env


def start_pyinfra(inventory: Path, deploy: str | Path, *extra: str) -> subprocess.Popen[str]:
    """A pyinfra run in the background, as run_pyinfra starts it; `parse(command, ...)` reads what it printed."""
    command, env = pyinfra_command(inventory, deploy, *extra)
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def run_pyinfra(inventory: Path, deploy: str | Path, *extra: str, timeout: float = 1800) -> PyinfraRun:
    """`pyinfra -y --json <inventory> <deploy> *extra` (this interpreter's pyinfra) from the repository root.

    A `.yaml` inventory goes through the root `inventory.py` (GPUFLEET_INVENTORY=<yaml>); a `.py` file is
    passed to pyinfra as it is.
    """
    # This checkout's gpufleet first, even where another checkout is pip-installed in editable mode.
    command, env = pyinfra_command(inventory, deploy, *extra)
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    return parse(command, proc)
