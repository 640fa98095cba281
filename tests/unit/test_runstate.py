"""Two pyinfra runs in one process, through pyinfra's API, each prepare deploys/full.py for a plan-test host (pyinfra's
fake connector, nothing is contacted): what one run remembers (refusals, steps planned once, the fleet report, the
once-per-run warning) never reaches the next (gpufleet.runstate)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.api.state import StateStage
from pyinfra.context import ctx_config, ctx_host, ctx_inventory, ctx_state
from pyinfra_cli.util import load_deploy_file

from deploys.torch import FROZEN_CU128_NOTICE
from gpufleet import hostlock
from gpufleet.fleet_report import _ReportAtEnd
from gpufleet.stage import refused, skip_remaining_stages, stopped, take_host_lock
from tests.conftest import REPO_ROOT
from tests.plan import fake_inventory

FULL = str(REPO_ROOT / "deploys" / "full.py")
PROFILE = fake_inventory.load_profile(REPO_ROOT / "tests" / "plan" / "profiles" / "ubuntu2404-5090d.yaml")
HOST = "@fake/ws01"
NVIDIA_REPOSITORY = "NVIDIA driver | Add NVIDIA's CUDA repository"
REFUSED_AS_PROPRIETARY = "Preflight | Refuse @fake/ws01: setting driver_flavour is 'proprietary'"


def fake_state(tmp_path: Path, **data: Any) -> State:
    """A pyinfra State holding the profile's host, with this host data (settings, group) over the profile's, connected."""
    data = {
        **PROFILE["settings"],
        "gpufleet_group": PROFILE["group"],
        "fake_responses": fake_inventory.fact_outputs(PROFILE),
        "fake_delay": 0,
        "fake_delay_jitter": 0,
        "wheel_cache_dir": str(tmp_path / "wheels"),
        "report_dir": str(tmp_path / "reports"),
        **data,
    }
    state = State(Inventory(([(HOST, data)], {})), Config())
    with ctx_state.use(state):
        state.set_stage(StateStage.Connect)
        connect_all(state)
    return state


def planned(state: State, deploy: str = FULL) -> list[str]:
    """A deploy file (deploys/full.py) prepared as `pyinfra` prepares it: the host's operations in order
    ("<deploy> | <name>")."""
    with ctx_state.use(state), ctx_inventory.use(state.inventory), ctx_config.use(state.config):
        state.set_stage(StateStage.Prepare)
        load_deploy_file(state, deploy)
    host = state.inventory.get_host(HOST)
    return [name for op_hash in state.get_op_order() if op_hash in state.ops[host]
            for name in sorted(state.op_meta[op_hash].names)]


def fleet_reports(state: State) -> int:
    return sum(isinstance(handler, _ReportAtEnd) for handler in state.callback_handlers)


def test_a_host_refused_in_one_run_is_planned_again_in_the_next_run_of_the_same_process(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pyinfra")
    first = fake_state(tmp_path)
    first_plan = planned(first)
    assert NVIDIA_REPOSITORY in first_plan and fleet_reports(first) == 1

    refusing = fake_state(tmp_path, driver_flavour="proprietary")
    assert [name[:len(REFUSED_AS_PROPRIETARY)] for name in planned(refusing)] == [REFUSED_AS_PROPRIETARY]

    # The refusal, the repository planned by the first run, its report and its warning do not reach this run.
    again = fake_state(tmp_path)
    assert planned(again) == first_plan
    assert fleet_reports(again) == 1
    assert [r.getMessage() for r in caplog.records].count(FROZEN_CU128_NOTICE) == 2


def test_a_cache_only_host_gets_the_fleet_cache_alone_and_the_next_run_plans_the_host_in_full(tmp_path):
    cache_host = {"gpufleet_group": "cache", "gpufleet_cache_server": True, "gpufleet_cache_address": "10.0.0.9",
                  "ssh_hostname": "10.0.0.9"}
    cache_plan = planned(fake_state(tmp_path, **cache_host))
    assert cache_plan and {name.split(" | ")[0] for name in cache_plan} == {"Fleet cache"}
    assert NVIDIA_REPOSITORY in planned(fake_state(tmp_path))


@pytest.mark.parametrize("stage", ["xformers", "preflight", "torch"])
def test_a_stage_run_alone_plans_nothing_on_a_cache_only_host_and_the_cache_stage_serves_it(tmp_path, stage):
    cache_host = {"gpufleet_group": "cache", "gpufleet_cache_server": True, "gpufleet_cache_address": "10.0.0.9",
                  "ssh_hostname": "10.0.0.9"}
    # Neither refused by preflight (it has no GPU stack to check) nor given one, as in deploys/full.py.
    assert planned(fake_state(tmp_path, **cache_host), str(REPO_ROOT / "deploys" / f"{stage}.py")) == []
    served = planned(fake_state(tmp_path, **cache_host), str(REPO_ROOT / "deploys" / "cache.py"))
    assert served and {name.split(" | ")[0] for name in served} == {"Fleet cache"}


def test_a_cache_only_host_is_stopped_without_being_refused(tmp_path):
    state = fake_state(tmp_path)
    with ctx_state.use(state), ctx_host.use(state.inventory.get_host(HOST)):
        state.set_stage(StateStage.Prepare)
        assert not stopped()
        skip_remaining_stages()
        assert stopped() and not refused()
    # Another run of the same host starts with it going on.
    next_run = fake_state(tmp_path)
    with ctx_state.use(next_run), ctx_host.use(next_run.inventory.get_host(HOST)):
        assert not stopped()


def test_each_run_releases_its_own_host_locks_after_its_last_operation(tmp_path, monkeypatch):
    log = tmp_path / "lock.log"
    # This machine's lock, owner record and log stay untouched: the lock lives in tmp_path.
    monkeypatch.setattr(hostlock, "HOLD", hostlock.HOLD.replace(hostlock.LOG, str(log)))
    monkeypatch.setattr(hostlock, "LOCK", str(tmp_path / "gpufleet.lock"))
    monkeypatch.setattr(hostlock, "OWNER", str(tmp_path / "gpufleet.owner"))
    monkeypatch.setattr(hostlock, "LOG", str(log))
    for run in (1, 2):
        state = State(Inventory((["@local"], {})), Config())
        with ctx_state.use(state), ctx_host.use(state.inventory.get_host("@local")):
            connect_all(state)
            state.set_stage(StateStage.Prepare)
            take_host_lock()
            assert not refused()
        releases = [h for h in state.callback_handlers if isinstance(h, hostlock._ReleaseAfterTheLastOperation)]
        assert len(releases) == 1, f"run {run} would keep its locks past its last operation"
        hostlock.release_all()
        deadline = time.monotonic() + 10
        while log.read_text().count("released") < run and time.monotonic() < deadline:
            time.sleep(0.1)
    assert log.read_text().count("taken") == 2 and log.read_text().count("released") == 2, log.read_text()


def test_run_state_outside_a_pyinfra_run_is_an_error_naming_why():
    with pytest.raises(RuntimeError, match="outside a pyinfra run"):
        refused()
