"""`gpufleet rollout`'s decisions without hosts: which hosts, which batches, what each host's run means."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpufleet import rollout
from gpufleet.inventory import load_inventory
from gpufleet.rollout import (
    CONVERGED, FAILED, PENDING, SMOKE_CHECK, UNCHANGED, RolloutError, batch_labels, judge, parse_run, plan_batches,
    select_hosts,
)
from gpufleet.settings import REPO_ROOT

INVENTORY = """settings: {reboot_policy: auto}
groups:
  workstations:
    hosts:
      ws01: {address: 192.0.2.11}
      ws02: {address: 192.0.2.12}
      lab-a: {address: 192.0.2.13}
  wsl:
    hosts:
      desk-07: {address: 192.0.2.40}
"""


@pytest.fixture
def inventory(tmp_path: Path):
    path = tmp_path / "hosts.yaml"
    path.write_text(INVENTORY)
    return load_inventory(path)


def test_hosts_in_inventory_order_narrowed_by_names_groups_and_globs(inventory):
    assert select_hosts(inventory, []) == ["ws01", "ws02", "lab-a", "desk-07"]
    assert select_hosts(inventory, ["wsl", "ws0*"]) == ["ws01", "ws02", "desk-07"]
    with pytest.raises(RolloutError, match="--limit 'ws9' matches no workstation or wsl host"):
        select_hosts(inventory, ["ws9"])


def test_canary_first_then_batches_of_the_given_size():
    hosts = [f"h{i}" for i in range(1, 7)]
    batches = plan_batches(hosts, canary=1, batch=2)
    assert batches == [["h1"], ["h2", "h3"], ["h4", "h5"], ["h6"]]
    assert batch_labels(batches, 1) == ["canary", "batch 1", "batch 2", "batch 3"]
    assert plan_batches(hosts, canary=0, batch=4) == [["h1", "h2", "h3", "h4"], ["h5", "h6"]]
    assert batch_labels(plan_batches(hosts, 0, 4), 0) == ["batch 1", "batch 2"]
    with pytest.raises(RolloutError):
        plan_batches(hosts, canary=1, batch=0)


def smoke_doc(host: str, failed_rung: str | None = None) -> dict:
    return {"tool": "gpufleet_smoke", "schema_version": 1, "host": host,
            "status": "failed" if failed_rung else "passed", "failed_rung": failed_rung,
            "rungs": [{"id": failed_rung or "matmul", "status": "failed" if failed_rung else "passed",
                       "message": "matmul result differs from the CPU reference" if failed_rung else ""}]}


def pyinfra_json(ops: list[tuple[str, list[str], list[str], list[str]]], failed: list[str] = ()) -> str:
    operations = [{"name": name, "success": s, "no_change": n, "error": e} for name, s, n, e in ops]
    return json.dumps({"results": {"operations": operations, "failed_hosts": list(failed)}})


def test_each_host_is_judged_by_its_run_and_its_smoke_result(tmp_path: Path):
    for host, rung in (("a", None), ("b", None), ("c", "matmul"), ("d", None)):
        (tmp_path / f"{host}.json").write_text(json.dumps(smoke_doc(host, rung)))
    stdout = pyinfra_json([
        ("NVIDIA driver | Install the NVIDIA driver (nvidia-open)", ["a", "c"], ["b"], []),
        ("NVIDIA driver | Stop e: reboot pending", [], ["a", "b", "c"], ["e"]),
        (f"Smoke test | {SMOKE_CHECK}", [], ["a", "b"], ["c"]),
        ("CUDA toolkit | Install the CUDA 12.8 toolkit (cuda-toolkit-12-8)", [], ["a", "b"], ["d"]),
    ], failed=["c", "d", "e"])
    stderr = ("[e] gpufleet refuses this host: reboot pending: the NVIDIA driver was installed or changed, but the "
              "host is busy (GPU compute processes: python3 (pid 4242))\n")
    outcomes = {o.host: o for o in judge(parse_run(1, stdout, stderr), ["a", "b", "c", "d", "e", "f"], tmp_path)}
    assert outcomes["a"].state == CONVERGED and outcomes["b"].state == UNCHANGED
    assert outcomes["c"].state == FAILED and "smoke test failed at rung matmul" in outcomes["c"].detail
    assert outcomes["d"].state == FAILED and "Install the CUDA 12.8 toolkit" in outcomes["d"].detail
    assert outcomes["e"].state == PENDING and "python3 (pid 4242)" in outcomes["e"].detail
    assert outcomes["f"].state == FAILED, "a host pyinfra never ran is not done"


def test_a_converged_host_whose_standing_smoke_result_failed_does_not_pass_the_gate(tmp_path: Path):
    (tmp_path / "a.json").write_text(json.dumps(smoke_doc("a", "sp24_sass")))
    stdout = pyinfra_json([("Smoke test | Fetch the smoke result to the control machine", [], ["a"], [])])
    (outcome,) = judge(parse_run(0, stdout, ""), ["a"], tmp_path)
    assert outcome.state == FAILED and "rung sp24_sass" in outcome.detail
    (tmp_path / "a.json").unlink()
    (outcome,) = judge(parse_run(0, stdout, ""), ["a"], tmp_path)
    assert outcome.state == FAILED and "no readable smoke result" in outcome.detail


def test_rollout_command_refuses_bad_arguments_before_any_host(tmp_path: Path):
    path = tmp_path / "hosts.yaml"
    path.write_text(INVENTORY)
    result = subprocess.run([sys.executable, "-m", "gpufleet.cli", "rollout", str(path), "--limit", "nope"],
                            capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 2 and "gpufleet rollout: --limit 'nope' matches no" in result.stderr
    result = subprocess.run([sys.executable, "-m", "gpufleet.cli", "rollout", str(path), "--max-failed", "-1"],
                            capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 2 and "--max-failed must be 0 or more" in result.stderr


def test_report_dir_comes_from_the_inventory(tmp_path: Path):
    path = tmp_path / "hosts.yaml"
    path.write_text(INVENTORY.replace("{reboot_policy: auto}", f"{{report_dir: {tmp_path}/r}}"))
    assert rollout._report_dir(load_inventory(path)) == tmp_path / "r" / "latest"
