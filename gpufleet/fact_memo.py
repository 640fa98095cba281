"""Each fact read once per host per run: pyinfra 3 keeps no fact cache, so every host.get_fact is a round trip.

pyinfra 3 runs an operation's body when it executes it and, unless run with -y, once before, while it prepares the
run, to show what would change; each time the body reads its facts. An answer stays true until something changes
the host, so it is kept until one of that host's operations runs a command on it. install() has pyinfra's command
classes record each host they run on, so the rule is exact: a read inside an operation after its own first command
reads afresh. It also routes the facts pyinfra's own operations read (MEMO_FACTS: a path's state, the accounts)
through the same memory, so a no-op run asks each host each question once.

Questions known in advance are asked together: expect() notes the facts an operation added while preparing will
read (gpufleet.operations' put_file and directory do it for pyinfra's files.put and files.directory), and the first
question the memory cannot answer for that host asks all of them in one round trip (Batch); ask_ahead() sends such a
list at once, for deploy code that knows what the stages will read (the host's profile, in preflight). Each answer is
then the fact's own process() of its own command's output, as if asked alone; one that failed is asked alone when
needed.
"""

from __future__ import annotations

import copy
import secrets
from typing import Any, TypeVar

from gevent.event import AsyncResult
from pyinfra.api import FactBase
from pyinfra.api import facts as pyinfra_facts
from pyinfra.api.arguments import pop_global_arguments
from pyinfra.api.command import FileUploadCommand, FunctionCommand, RsyncCommand, StringCommand
from pyinfra.api.host import Host
from pyinfra.api.state import State, StateStage
from pyinfra.context import ctx_config, ctx_state
from pyinfra.facts.files import Directory, File, FileContents, Link, Md5File, Sha1File, Sha256File
from pyinfra.facts.server import Groups, Users

from gpufleet import pyinfra_speed
from gpufleet.runstate import run_of

T = TypeVar("T")

# The facts of pyinfra's own operations that answer from memory while the host is unchanged.
MEMO_FACTS: frozenset[type[FactBase]] = frozenset(
    {File, Directory, Link, Sha1File, Sha256File, Md5File, FileContents, Users, Groups})
# Commands that change a host when they run (a download only reads it).
_CHANGING_COMMANDS = (StringCommand, FileUploadCommand, FunctionCommand, RsyncCommand)
# The arguments that decide how a fact's command runs on the host (as whom, where, with what environment).
_HOW_TO_RUN = ("_sudo", "_sudo_user", "_use_sudo_login", "_preserve_sudo_env", "_su_user", "_use_su_login",
               "_preserve_su_env", "_su_shell", "_doas", "_doas_user", "_dzdo", "_dzdo_user", "_shell_executable",
               "_chdir", "_env")
_NOT_GIVEN = object()


def unchanged_since_prepare(run: State, target: Host) -> bool:
    """True while none of target's operations has run a command on it in this run."""
    return target.name not in run_of(run).changed_hosts


def _ask(target: Host, cls: type[FactBase[T]], kwargs: dict[str, Any]) -> T:
    return pyinfra_facts.get_fact(target.state, target, cls, args=(), kwargs=kwargs)


class Batch(FactBase[list[str]]):
    """Several facts' commands in one round trip: their outputs, each framed by marker lines with its exit status."""

    def command(self, commands: tuple[str, ...], marker: str) -> str:
        return "; ".join(f"echo {marker}; ( {command} ) 2>/dev/null; echo {marker} $?" for command in commands)

    def process(self, output: list[str]) -> list[str]:
        return output


def _key(run: State, target: Host, cls: type[FactBase], kwargs: dict[str, Any]) -> tuple[str, type, str, str]:
    # How pyinfra will run the command (the operation's sudo, user, env, else the host's): part of the question.
    return (target.name, cls, repr(sorted(kwargs.items())), _how_to_run(run, target, kwargs))


def _how_to_run(run: State, target: Host, kwargs: dict[str, Any]) -> str:
    """The _HOW_TO_RUN arguments pyinfra's pop_global_arguments resolves for this question, as a string.

    They follow from the arguments given (the fact's, else the operation's), the @deploy's, the host's data and
    pyinfra's config; pop_global_arguments walks all of pyinfra's ~40 arguments through the host's data, so its answer
    is kept per run for each combination of those inputs."""
    given = {**(target.current_op_global_arguments or {}), **kwargs}
    config = ctx_config.get() if ctx_config.isset() else run.config
    inputs = (target.name, id(config), repr(sorted((target.current_deploy_kwargs or {}).items())),
              repr([given.get(name, _NOT_GIVEN) for name in _HOW_TO_RUN]), repr(target.data.override_datas))
    known = run_of(run).how_to_run
    if inputs not in known:
        how, _ = pop_global_arguments(run, target, given)
        known[inputs] = repr([how.get(name) for name in _HOW_TO_RUN])
    return known[inputs]


def _plain(cls: type[FactBase]) -> bool:
    """A fact that is one command and its output: one with a tool check, a precondition or its own shell is asked
    alone, with pyinfra's handling of those."""
    return (cls.requires_command is FactBase.requires_command and cls.check_preconditions is FactBase.check_preconditions
            and not cls.shell_executable)


def expect(target: Host, cls: type[FactBase], **kwargs: Any) -> None:
    """Notes a question target will be asked in this run, to be asked with the first one it cannot answer yet."""
    run = ctx_state.get()
    if run is not None and _plain(cls) and not any(name.startswith("_") for name in kwargs):
        run_of(run).fact_expected.setdefault(target.name, {})[(cls, repr(sorted(kwargs.items())))] = kwargs


def ask_ahead(target: Host, questions: list[tuple[type[FactBase], dict[str, Any]]]) -> None:
    """Asks target these questions now, with any already expected, in one round trip; fact() then answers them
    from memory. For deploy code that knows what the stages will read before they read it (gpufleet.stage.profile).
    """
    run = ctx_state.get()
    if run is None or not unchanged_since_prepare(run, target):
        return
    answers = run_of(run).fact_answers
    unanswered = [(cls, kwargs) for cls, kwargs in questions if _key(run, target, cls, kwargs) not in answers]
    if not unanswered:
        return
    for cls, kwargs in unanswered[1:]:
        expect(target, cls, **kwargs)
    _ask_together(run, target, unanswered[0])


def _ask_together(run: State, target: Host, first: tuple[type[FactBase], dict[str, Any]]) -> None:
    """Asks first and every question expected on target in one round trip, and keeps the answers that came."""
    state = run_of(run)
    questions = [first, *((cls, kwargs) for (cls, _), kwargs in state.fact_expected.pop(target.name, {}).items())]
    asked: list[tuple[tuple[str, type, str, str], FactBase, Any]] = []
    for cls, kwargs in questions:
        key = _key(run, target, cls, kwargs)
        if key not in state.fact_answers and _plain(cls) and key not in [k for k, _, _ in asked]:
            fact_ = cls()
            command = fact_.command(**kwargs)
            asked.append((key, fact_, command.get_raw_value() if isinstance(command, StringCommand) else command))
    if len(asked) < 2:
        return
    marker = f"@@gpufleet-{secrets.token_hex(8)}"
    lines = iter(_ask(target, Batch, {"commands": tuple(c for _, _, c in asked), "marker": marker}) or [])
    for key, fact_, _ in asked:
        if next(lines, None) != marker:
            return
        output, status = [], None
        for line in lines:
            if line.startswith(f"{marker} "):
                status = line[len(marker) + 1:]
                break
            output.append(line)
        if status is None:
            return
        # A command that failed, or output its fact cannot read, is left to be asked alone with pyinfra's handling.
        if status != "0" or key in state.fact_answers:
            continue
        try:
            answer = fact_.process(output) if output else fact_.default()
        except Exception:
            continue
        result = state.fact_answers[key] = AsyncResult()
        result.set(answer)


def fact(target: Host, cls: type[FactBase[T]], **kwargs: Any) -> T:
    """target.get_fact(cls, **kwargs), fetched once per host, fact and arguments while the host is unchanged."""
    run = ctx_state.get()
    if run is None or not unchanged_since_prepare(run, target):
        return _ask(target, cls, kwargs)
    key = _key(run, target, cls, kwargs)
    # Per run (gpufleet.runstate). Hosts are prepared in parallel greenlets and read each other's facts
    # (xformers_fleet), so a second reader waits for the first.
    answers = run_of(run).fact_answers
    # Once the questions are all known: when executing, or in an operation's body (whose own questions were noted
    # just before pyinfra runs it to preview a change); not from deploy code still adding operations.
    if (key not in answers and run_of(run).fact_expected.get(target.name)
            and (run.current_stage == StateStage.Execute or target.in_op)):
        _ask_together(run, target, (cls, kwargs))
    if key not in answers:
        answer = answers[key] = AsyncResult()
        try:
            answer.set(_ask(target, cls, kwargs))
        except Exception as error:
            answer.set_exception(error)
            raise
    # A copy: pyinfra's operations may change the answer they were given (a package list they plan to extend).
    return copy.deepcopy(answers[key].get())


def install() -> None:
    """Routes MEMO_FACTS through fact() and has every changing command record its host (idempotent)."""
    pyinfra_speed.install()
    if getattr(Host.get_fact, "_gpufleet_memo", False):
        return
    asked = Host.get_fact

    def get_fact(self: Host, name_or_cls: Any, *args: Any, **kwargs: Any) -> Any:
        if name_or_cls in MEMO_FACTS and not args:
            return fact(self, name_or_cls, **kwargs)
        return asked(self, name_or_cls, *args, **kwargs)

    get_fact._gpufleet_memo = True  # type: ignore[attr-defined]
    Host.get_fact = get_fact  # type: ignore[method-assign]
    for command in _CHANGING_COMMANDS:
        _record_runs(command)


def _record_runs(command: type) -> None:
    runs = command.execute

    def execute(self: Any, state: State, host: Host, connector_arguments: Any) -> Any:
        run_of(state).changed_hosts.add(host.name)
        return runs(self, state, host, connector_arguments)

    command.execute = execute


# fact() is only right while commands record their hosts: whoever can ask has the recording on.
install()
