"""HostProbe, preflight's probes in one command: run for real on this machine, and read each part with that part's
own parser; output it does not know fails that host (FactProcessError), never the run."""

from __future__ import annotations

import subprocess

import pytest
from pyinfra.api.exceptions import FactProcessError

from gpufleet.facts import HostProbe, OsInfo, parse_os_release


def run(command: str) -> list[str]:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout.splitlines()


def test_one_command_answers_every_part_as_its_own_fact_would_on_this_machine() -> None:
    answers = HostProbe().process(run(HostProbe().command(disk_paths=("/", "/no/such/dir/yet"))))
    assert set(answers) == set(HostProbe.PARTS) | {"disks"}
    assert answers["os"] == parse_os_release(open("/etc/os-release").read())
    assert answers["os"] == OsInfo().process(run(OsInfo().command()))
    assert answers["mem"]["total"] > 0 and answers["mem"]["cpus"] >= 1
    # A path that does not exist yet is measured on its nearest existing parent: here both are "/".
    assert [d["mount"] for d in answers["disks"]] == ["/", "/"]
    assert isinstance(answers["tools"], list) and isinstance(answers["pci"], (list, type(None)))


def sections(**parts: str) -> list[str]:
    text = "".join(f"=== {name}\n{out}\n=== rc 0\n" for name, out in parts.items())
    return text.splitlines()


def test_a_part_with_no_output_gets_that_fact_s_default() -> None:
    lines = sections(os="ID=debian", wsl="6.1.0\nsmi=no", pci="", smi="__GPUFLEET_NO_TOOL__",
                     mem="MemTotal: 1024 kB\nMemAvailable: 512 kB\ncpus=2",
                     driver="== proc\n== modinfo\n== dpkg\n== runfile\nno",
                     secure_boot="__GPUFLEET_NO_TOOL__", tools="", disk0="h\n/dev/x 1 2 3 4% /")
    answers = HostProbe().process(lines)
    assert answers["pci"] == [] and answers["tools"] == [] and answers["secure_boot"] is None
    assert answers["disks"] == [{"free": 3 * 1024, "mount": "/"}]


@pytest.mark.parametrize("output", [
    ["=== os", "ID=debian", "=== rc 1"],
    ["=== os", "ID=debian"],
    ["=== os", "ID=debian", "=== rc 0"],
    ["<html>", "=== os"],
    ["=== nonsense", "=== rc 0"],
])
def test_a_failed_part_or_cut_output_fails_that_host(output: list[str]) -> None:
    with pytest.raises(FactProcessError):
        HostProbe().process(output)
