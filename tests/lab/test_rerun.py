"""A no-op re-run of the real stages on lab build-env hosts, through the real pyinfra CLI: it does not import torch
and it sends each host a bounded number of commands (counted in pyinfra's --debug log).

Real: preflight..xformers over SSH, the torch 2.14.1 venv, the xformers wheel built by CI the way a host builds it
(seeded into this test's wheel cache, so nothing compiles here). Stand-in: the GPU and its open 580 driver.
Speed itself is measured by benchmarks/rerun.py, not here.
"""

import re
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from gpufleet_lab import Lab
from gpufleet_lab.hosts import Host
from gpufleet_lab.runner import REPO_ROOT, PyinfraRun
from tests.lab.test_xformers_stage import build_hosts  # noqa: F401  (the fixture, shared)

pytestmark = [pytest.mark.lab, pytest.mark.build]

STAGES = REPO_ROOT / "tests" / "lab" / "deploys" / "stages_to_xformers.py"
TORCH_STAGE = REPO_ROOT / "deploys" / "torch.py"
TRACE = "/var/tmp/torch-imports"
RECORD_OP = "Record the validated torch"
# Commands per host in a no-op of preflight..xformers. Before each fact was read once per run (and preflight's probes
# went in one) the same no-op sent 70 per host (2 hosts and 3 alike); then 21; then 10, once the path questions of
# pyinfra's files operations went to the host together (gpufleet.fact_memo.expect); now 4, since preflight asks
# what the stages read next with HostProbe (gpufleet.stage.read_ahead).
NOOP_COMMANDS_PER_HOST = 6


def inventory(lab: Lab, make_inventory: Callable[..., Path], hosts: list[Host], wheel_cache: Path) -> Path:
    path = make_inventory(hosts, kind="yaml")
    document = yaml.safe_load(path.read_text())
    document["settings"].update({
        **lab.build_settings(), "xformers_arch_list": ["12.0"], "reboot_policy": "never", "min_free_disk_gb": 10,
        "wheel_cache_dir": str(wheel_cache)})
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def seeded_wheel_cache(ci_wheel, tmp_path: Path) -> Path:
    cache = tmp_path / "wheel-cache"
    shutil.copytree(ci_wheel.out_dir, cache / ci_wheel.out_dir.name)
    return cache


def commands_per_host(run: PyinfraRun) -> Counter:
    """Commands pyinfra ran on each host, from its --debug log (a no-op moves no files)."""
    counts: Counter = Counter()
    for line in run.stderr.splitlines():
        match = re.search(r"Running command on (\S+):", line)
        if match:
            counts[match[1]] += 1
    return counts


def trace_torch_imports(lab: Lab, host: Host) -> None:
    """Make every `import torch` on the host append a line to TRACE (a first line in torch's own __init__.py)."""
    torch = "/opt/torchvenv/lib/python3.11/site-packages/torch"
    line = f"open('{TRACE}', 'a').write('imported\\\\n')"
    result = lab.ssh(host, f'cd {torch} && {{ echo "{line}"; cat __init__.py; }} > init.new && mv init.new __init__.py'
                           f" && cd / && : > {TRACE} && /opt/torchvenv/bin/python -c 'import torch' && wc -l < {TRACE}")
    assert result.returncode == 0 and result.stdout.strip() == "1", result


def imports(lab: Lab, host: Host) -> int:
    return int(lab.ssh(host, f"wc -l < {TRACE}").stdout.strip())


def test_a_no_op_run_does_not_import_torch_and_a_changed_torch_is_validated_again(
        lab: Lab, build_hosts: Callable[[int], list[Host]], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun], tmp_path: Path) -> None:
    host = build_hosts(1)[0]
    trace_torch_imports(lab, host)
    path = inventory(lab, make_inventory, [host], tmp_path / "no-wheels")

    first = run_pyinfra(path, TORCH_STAGE)
    first.assert_converged([host.name])
    assert any(op.endswith(RECORD_OP + " (its files, interpreter, GPUs and driver)") for op in first.changes(host.name)), \
        first.explain()
    after_first = imports(lab, host)
    assert after_first >= 1
    stamp = lab.ssh(host, "stat -c '%U %a' /var/lib/gpufleet-state /var/lib/gpufleet-state/torch-*").stdout.split("\n")
    assert stamp[:2] == ["root 700", "root 600"], stamp

    run_pyinfra(path, TORCH_STAGE).assert_no_changes([host.name])
    assert imports(lab, host) == after_first, "a no-op run imported torch"

    # What a reinstall of torch does to its dist-info: a new RECORD.
    lab.ssh(host, "echo 'torch/new_file.py,,' >> /opt/torchvenv/lib/python3.11/site-packages/torch-*.dist-info/RECORD")
    changed = run_pyinfra(path, TORCH_STAGE)
    changed.assert_converged([host.name])
    assert any(RECORD_OP in op for op in changed.changes(host.name)), changed.explain()
    assert imports(lab, host) > after_first, "a changed torch was not imported again"
    validated = imports(lab, host)

    run_pyinfra(path, TORCH_STAGE).assert_no_changes([host.name])
    assert imports(lab, host) == validated


def test_a_stamp_the_build_user_could_write_is_not_trusted(
        lab: Lab, build_hosts: Callable[[int], list[Host]], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun], tmp_path: Path) -> None:
    host = build_hosts(1)[0]
    trace_torch_imports(lab, host)
    path = inventory(lab, make_inventory, [host], tmp_path / "no-wheels")
    run_pyinfra(path, TORCH_STAGE).assert_converged([host.name])
    lab.ssh(host, "chmod 777 /var/lib/gpufleet-state")
    before = imports(lab, host)
    again = run_pyinfra(path, TORCH_STAGE)
    again.assert_converged([host.name])
    assert imports(lab, host) > before, "a world-writable stamp folder was trusted"
    assert lab.ssh(host, "stat -c %a /var/lib/gpufleet-state").stdout.strip() == "700"


def test_a_no_op_run_sends_each_host_a_bounded_number_of_commands(
        lab: Lab, build_hosts: Callable[[int], list[Host]], make_inventory: Callable[..., Path],
        run_pyinfra: Callable[..., PyinfraRun], ci_wheel, tmp_path: Path) -> None:
    hosts = build_hosts(2)
    names = [h.name for h in hosts]
    path = inventory(lab, make_inventory, hosts, seeded_wheel_cache(ci_wheel, tmp_path))
    run_pyinfra(path, STAGES).assert_converged(names)
    noop = run_pyinfra(path, STAGES, "--debug")
    noop.assert_no_changes(names)
    counts = commands_per_host(noop)
    for name in names:
        assert 0 < counts[name] <= NOOP_COMMANDS_PER_HOST, (counts, noop.explain())
