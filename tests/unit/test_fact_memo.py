"""gpufleet.fact_memo on a real pyinfra State with the @local connector: a fact runs once per host while pyinfra
prepares the deploy and while executing leaves the host unchanged, and again once an operation has run a command,
also for the path facts pyinfra's own operations read."""

from __future__ import annotations

from pathlib import Path

from pyinfra import host as current_host
from pyinfra.api import Config, FactBase, Inventory, State, operation
from pyinfra.api.connect import connect_all
from pyinfra.api.operation import add_op
from pyinfra.api.operations import run_ops
from pyinfra.operations import server
from pyinfra.api.state import StateStage
from pyinfra.context import ctx_host, ctx_state

from gpufleet.fact_memo import fact


class LinesOf(FactBase):
    """Appends a line to a trace file each time it runs, and reports how many lines it holds."""

    def command(self, trace: str) -> str:
        return f"echo ran >> {trace}; wc -l < {trace}"

    def process(self, output: list[str]) -> int:
        return int(output[0])


def local_state() -> State:
    state = State(Inventory((["@local"], {})), Config())
    connect_all(state)
    return state


def commands_sent(host) -> list[str]:
    """Every command host runs from now on, recorded in the returned list."""
    asked: list[str] = []
    original = host.run_shell_command

    def counted(command, *args, **kwargs):
        asked.append(str(command))
        return original(command, *args, **kwargs)

    host.run_shell_command = counted
    return asked


def test_a_fact_is_read_once_per_host_and_arguments_while_the_deploy_is_prepared(tmp_path: Path) -> None:
    state = local_state()
    host = state.inventory.get_host("@local")
    trace, other = tmp_path / "trace", tmp_path / "other"
    with ctx_state.use(state), ctx_host.use(host):
        state.set_stage(StateStage.Prepare)
        assert [fact(host, LinesOf, trace=str(trace)) for _ in range(3)] == [1, 1, 1]
        # Other arguments are another question.
        assert fact(host, LinesOf, trace=str(other)) == 1
        assert trace.read_text() == "ran\n" and other.read_text() == "ran\n"


def test_a_question_asked_another_way_is_another_question(tmp_path: Path) -> None:
    state = local_state()
    host = state.inventory.get_host("@local")
    trace = tmp_path / "trace"
    with ctx_state.use(state), ctx_host.use(host):
        state.set_stage(StateStage.Prepare)
        assert fact(host, LinesOf, trace=str(trace)) == 1
        # With another environment (or user, or directory) the command runs again, once per way of asking.
        assert [fact(host, LinesOf, trace=str(trace), _env={"LANG": "C"}) for _ in range(2)] == [2, 2]
        assert fact(host, LinesOf, trace=str(trace), _chdir=str(tmp_path)) == 3
        # Inside an operation, its arguments are the way of asking.
        host.current_op_global_arguments = {"_env": {"LANG": "C"}}
        try:
            assert [fact(host, LinesOf, trace=str(trace)) for _ in range(2)] == [4, 4]
        finally:
            host.current_op_global_arguments = None
        assert fact(host, LinesOf, trace=str(trace)) == 1


@operation()
def note_lines(trace: str, seen: list):
    """Records what LinesOf answers, and changes nothing (so pyinfra plans no command for it)."""
    seen.append(fact(current_host, LinesOf, trace=trace))
    yield from ()


@operation()
def write_then_note_lines(trace: str, seen: list):
    """Appends to the trace file with a command of its own, then records what LinesOf answers."""
    yield f"echo wrote >> {trace}"
    seen.append(fact(current_host, LinesOf, trace=trace))


def run_reads(state: State, trace: Path, before: list, after: list, read_while_preparing: bool = False) -> list:
    """Runs the read operations `before`, then `true`, then `after` on @local; what each read saw, in order."""
    host = state.inventory.get_host("@local")
    seen: list = []
    state.set_stage(StateStage.Prepare)
    with ctx_state.use(state), ctx_host.use(host):
        if read_while_preparing:
            seen.append(fact(host, LinesOf, trace=str(trace)))
        for op in before:
            add_op(state, op, trace=str(trace), seen=seen)
        add_op(state, server.shell, commands=["true"])
        for op in after:
            add_op(state, op, trace=str(trace), seen=seen)
    state.set_stage(StateStage.Execute)
    run_ops(state)
    return seen


def test_executing_operations_reuse_an_answer_until_one_runs_a_command(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    seen = run_reads(local_state(), trace, [note_lines, note_lines], [note_lines])
    # Prepared: one read shared by the three operations. Executed: the first two reuse it, since no command has
    # run; the third reads again after `true` ran, and its fresh answer is what it sees.
    assert seen == [1, 1, 1, 1, 1, 2]
    assert trace.read_text() == "ran\nran\n"


def test_each_run_state_has_its_own_answers(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    for expected in (1, 2):
        state = local_state()
        host = state.inventory.get_host("@local")
        with ctx_state.use(state), ctx_host.use(host):
            state.set_stage(StateStage.Prepare)
            assert fact(host, LinesOf, trace=str(trace)) == expected


def test_under_yes_operations_reuse_an_answer_until_one_runs_a_command(tmp_path: Path) -> None:
    # `pyinfra -y` does not look for changes while preparing, so an operation's body runs only when executed.
    state = State(Inventory((["@local"], {})), Config(), check_for_changes=False)
    connect_all(state)
    seen = run_reads(state, tmp_path / "trace", [note_lines, note_lines], [note_lines], read_while_preparing=True)
    # No command has run before the first two reads; `true` has before the third.
    assert seen == [1, 1, 1, 2]


def test_a_read_after_the_operations_own_command_sees_its_effect(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    state = State(Inventory((["@local"], {})), Config(), check_for_changes=False)
    connect_all(state)
    seen = run_reads(state, trace, [note_lines, write_then_note_lines], [], read_while_preparing=True)
    # The second operation's read follows its own `echo`: a fresh answer that counts the written line.
    assert seen == [1, 1, 3]
    assert trace.read_text() == "ran\nwrote\nran\n"


def test_pyinfra_operations_read_their_path_facts_once_while_the_host_is_unchanged(tmp_path: Path) -> None:
    from pyinfra.facts.files import File
    from pyinfra.operations import files

    target = tmp_path / "kept"
    target.write_text("same\n")
    state = State(Inventory((["@local"], {})), Config(), check_for_changes=False)
    connect_all(state)
    host = state.inventory.get_host("@local")
    asked = commands_sent(host)
    state.set_stage(StateStage.Prepare)
    with ctx_state.use(state), ctx_host.use(host):
        assert host.get_fact(File, path=str(target)) is not None
        for _ in range(3):
            add_op(state, files.file, path=str(target), present=True)
    state.set_stage(StateStage.Execute)
    run_ops(state)
    # One round trip for the File fact, shared by the read while preparing and the three operations' own reads.
    assert len([c for c in asked if str(target) in c]) == 1, asked


def test_expected_questions_go_to_the_host_in_one_round_trip_with_the_answers_asked_alone_would_give(
        tmp_path: Path) -> None:
    from pyinfra.facts.files import Directory, File, Sha1File

    from gpufleet.fact_memo import expect

    (tmp_path / "a").write_text("alpha\n")
    (tmp_path / "d").mkdir()
    questions = [(File, str(tmp_path / "a")), (Sha1File, str(tmp_path / "a")), (Directory, str(tmp_path / "d")),
                 (File, str(tmp_path / "missing")), (Directory, str(tmp_path / "a"))]
    alone = local_state()
    alone_host = alone.inventory.get_host("@local")
    expected_answers = [alone_host.get_fact(cls, path=path) for cls, path in questions]

    state = local_state()
    host = state.inventory.get_host("@local")
    asked = commands_sent(host)
    with ctx_state.use(state), ctx_host.use(host):
        state.set_stage(StateStage.Prepare)
        for cls, path in questions[1:]:
            expect(host, cls, path=path)
        # Deploy code still adding operations asks alone; once executing, the questions go together.
        state.set_stage(StateStage.Execute)
        answers = [host.get_fact(cls, path=path) for cls, path in questions]
    # Reading a file's checksum may move its access time between the two runs.
    def settled(answer):
        return {k: v for k, v in answer.items() if k != "atime"} if isinstance(answer, dict) else answer

    assert [settled(a) for a in answers] == [settled(a) for a in expected_answers]
    assert expected_answers[1] is not None and expected_answers[3] is None
    assert len(asked) == 1, asked


def test_the_profiles_questions_go_in_one_round_trip_with_the_answers_asked_alone_would_give(tmp_path: Path) -> None:
    from gpufleet import facts
    from gpufleet.fact_memo import ask_ahead
    from gpufleet.stage import read_ahead

    (tmp_path / "work").mkdir()
    config = {"build_user": "root", "venv_path": str(tmp_path / "no-venv"), "work_dir": str(tmp_path / "work"),
              "cuda_existing_home": None, "cuda_version": "12.8"}
    questions = [(facts.HostProbe, {"disk_paths": (config["work_dir"], config["venv_path"])}), *read_ahead(config)]
    alone = local_state()
    alone_host = alone.inventory.get_host("@local")
    expected_answers = [alone_host.get_fact(cls, **kwargs) for cls, kwargs in questions]

    state = local_state()
    host = state.inventory.get_host("@local")
    asked = commands_sent(host)
    with ctx_state.use(state), ctx_host.use(host):
        state.set_stage(StateStage.Prepare)
        ask_ahead(host, questions)
        answers = [fact(host, cls, **kwargs) for cls, kwargs in questions]
        ask_ahead(host, questions)

    # Free memory and disk move between the two reads; the rest is the same answer.
    def settled(answer):
        if isinstance(answer, dict):
            return {k: v for k, v in answer.items() if k not in ("mem", "disks", "atime")}
        return answer

    assert [settled(a) for a in answers] == [settled(a) for a in expected_answers]
    assert expected_answers[2] is None and expected_answers[5] is not None
    assert len(asked) == 1, asked
