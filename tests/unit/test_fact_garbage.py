"""Every gpufleet fact, fed output its command never prints, fails that host alone: a FactProcessError naming the
fact and quoting the output. Any other exception from a fact's process() aborts pyinfra's run for every host.

The facts are found by introspection, so a fact added to gpufleet/facts.py is fed the same garbage."""

from __future__ import annotations

import pytest
from pyinfra.api import FactBase
from pyinfra.api.exceptions import FactProcessError

from gpufleet import facts

FACTS = sorted(
    (cls for cls in vars(facts).values()
     if isinstance(cls, type) and issubclass(cls, FactBase) and cls.__module__ == facts.__name__
     and not cls.__name__.startswith("_")),
    key=lambda cls: cls.__name__,
)

# Facts whose output is free text, so no output is garbage to them: they must still never raise.
FREE_TEXT = {
    "InterruptedPackageInstall": "dpkg --audit's report is free text; any output is unfinished work",
}

EMPTY = {"a blank line": [""], "blank lines": ["", "   ", "\t"]}
GARBAGE = {
    "binary-ish text": ["\x7fELF\x02\x01\x01\x00\x00\x00\ufffd\ufffd", "\x1b[31m\x00\x08\ufffd garbled \x1b[0m"],
    "a JSON list": ['["version", "cuda", "arch_list"]'],
    "a JSON string": ['"2.11.0+cu128"'],
    "a cut sectioned output": ["== proc", "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05"],
    "a cut probe output": ["=== os", "ID=debian", 'VERSION_ID="12"'],
    "an HTML error page": ["<html><head><title>502 Bad Gateway</title></head>", "<body>nginx</body></html>"],
}


def test_facts_are_found():
    names = {cls.__name__ for cls in FACTS}
    assert {"HostProbe", "TorchInfo", "InterruptedPackageInstall", "HasSystemd", "DevpiMirrors"} <= names


@pytest.mark.parametrize("fact", FACTS, ids=lambda cls: cls.__name__)
def test_every_fact_reads_its_output_through_the_host_only_failure(fact):
    # _HostFact.process turns any error of parse() into a FactProcessError: a fact of its own process() would not.
    assert issubclass(fact, facts._HostFact)
    assert fact.process is facts._HostFact.process


@pytest.mark.parametrize("kind", GARBAGE)
@pytest.mark.parametrize("fact", FACTS, ids=lambda cls: cls.__name__)
def test_garbage_fails_that_host_only_naming_the_fact_and_the_output(fact, kind):
    output = GARBAGE[kind]
    if fact.__name__ in FREE_TEXT:
        fact().process(output)
        return
    with pytest.raises(FactProcessError) as raised:
        fact().process(output)
    assert str(raised.value).startswith(f"{fact.__name__}: ")
    assert repr("\n".join(output)) in str(raised.value)


@pytest.mark.parametrize("kind", EMPTY)
@pytest.mark.parametrize("fact", FACTS, ids=lambda cls: cls.__name__)
def test_blank_output_reads_as_nothing_or_fails_that_host_only(fact, kind):
    # pyinfra gives a fact with no output its default(); blank lines must not read as something found.
    output = EMPTY[kind]
    try:
        answer = fact().process(output)
    except FactProcessError as error:
        assert str(error).startswith(f"{fact.__name__}: ")
        assert repr("\n".join(output)) in str(error)
    else:
        assert not answer, answer


def test_torch_info_given_json_of_the_wrong_shape_fails_that_host_only():
    for body in ('["2.11.0"]', '{"version": 2.11, "cuda": "12.8", "arch_list": ["sm_120"]}',
                 '{"version": "2.11.0", "cuda": "12.8", "arch_list": "sm_120"}'):
        with pytest.raises(FactProcessError, match="TorchInfo: unexpected torch probe output"):
            facts.TorchInfo().process(["== probed", body])


def test_a_long_output_is_quoted_in_part():
    output = ["x" * 5000]
    with pytest.raises(FactProcessError) as raised:
        facts.OsInfo().process(output)
    assert len(str(raised.value)) < 1000
