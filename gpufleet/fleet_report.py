"""Print the fleet report once pyinfra has finished with every host (to stderr, so --json stays clean)."""

from __future__ import annotations

from pathlib import Path

from pyinfra import state as current_state
from pyinfra.api.state import BaseStateCallback, StateStage

from gpufleet.runstate import RunState, this_run


class _ReportAtEnd(BaseStateCallback):
    def __init__(self, directory: Path, run: RunState):
        self.directory = directory
        self.run = run
        self.disconnected = 0

    def host_disconnect(self, state, host) -> None:  # type: ignore[override]
        self.disconnected += 1
        if self.disconnected < len(state.activated_hosts) or not self.directory.is_dir():
            return
        if state.current_stage != StateStage.Disconnect:
            return
        from rich.console import Console

        from gpufleet import report, report_history

        summary = report.write_report(self.directory)
        if summary["hosts"]:
            report.print_report(summary, stderr=True)
            Console(stderr=True, highlight=False).print(
                f"Fleet report with charts: {self.directory / report.HTML_NAME}", overflow="fold")
        # A run that tested hosts says what changed since the run before it (a new driver that made one slower).
        if self.run.history_run_name is not None:
            since = report_history.since_previous_run(report_history.history_for(self.directory),
                                                      self.run.history_run_name)
            if since:
                previous, changes = since
                report_history.print_compare(changes, previous, report.OUTLIER_FRACTION, stderr=True)


def print_report_when_run_ends(directory: Path) -> None:
    """Register (once per run) the callback that prints the fleet table when the last host disconnects."""
    run = this_run()
    if run.report_registered:
        return
    run.report_registered = True
    current_state.add_callback_handler(_ReportAtEnd(directory, run))


def history_run_name() -> str:
    """This pyinfra run's folder under <report_dir>/history: its start time, the same for every host."""
    from gpufleet.report_history import run_name

    run = this_run()
    if run.history_run_name is None:
        run.history_run_name = run_name()
    return run.history_run_name
