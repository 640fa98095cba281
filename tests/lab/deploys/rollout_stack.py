"""Preflight, driver, CUDA and Python as deploys/full.py runs them, then a STAND-IN health gate in the smoke stage's
place (the lab cannot run CUDA, so the real smoke test cannot pass here).

The stand-in writes a document in the smoke test's format (gpufleet_smoke, schema 1) to the same place the smoke stage
uses, fetches it to <report_dir>/latest/<host>.json and fails the host with the smoke stage's own check when it did
not pass. It fails on demand: when /etc/gpufleet-lab/health-fault exists on the host, the rung named in it fails.
Like the smoke stage it runs again only when the stack changed in this run or its inputs did (the fault file's
content, driver_branch); a converged host's re-run changes nothing.
"""

import hashlib
from pathlib import Path

from pyinfra import host, state
from pyinfra.api import deploy
from pyinfra.facts.files import File
from pyinfra.facts.server import Command
from pyinfra.operations import files, server

from deploys.cuda import cuda
from deploys.driver import driver
from deploys.preflight import preflight
from deploys.python import python
from gpufleet.rollout import SMOKE_CHECK
from gpufleet.settings import REPO_ROOT
from gpufleet.stage import refused, settings, stack_changed

FAULT = "/etc/gpufleet-lab/health-fault"
WRITE_DOCUMENT = r"""
import json, os, sys
fault = open(sys.argv[2]).read().strip() if os.path.exists(sys.argv[2]) else ""
rungs = [{"id": "driver", "status": "passed", "message": ""}, {"id": "matmul", "status": "passed", "message": ""}]
for rung in rungs:
    if rung["id"] == fault:
        rung.update(status="failed", message="gpufleet lab STAND-IN health check: fault injected by the test")
failed = next((r["id"] for r in rungs if r["status"] == "failed"), None)
doc = {"tool": "gpufleet_smoke", "schema_version": 1, "host": sys.argv[3], "synthetic": True,
       "status": "failed" if failed else "passed", "failed_rung": failed, "rungs": rungs, "versions": {}}
json.dump(doc, open(sys.argv[1], "w"))
"""


@deploy("Smoke test")
def health_standin() -> None:
    config = settings()
    work = f"{config['work_dir']}/smoke"
    fault = host.get_fact(Command, command=f"cat {FAULT} 2>/dev/null || true")
    stamp = hashlib.sha256(f"{fault}\0{config['driver_branch']}".encode()).hexdigest()[:16]
    result = f"{work}/standin-{stamp}.json"
    have_result = bool(host.get_fact(File, path=result))
    changed = stack_changed()
    needed = lambda: not have_result or changed()  # noqa: E731
    files.directory(name="Create the smoke test directory", path=work, mode="755")
    server.shell(
        name="Run the STAND-IN health check (lab)",
        commands=[f"rm -f {work}/standin-*.json; python3 -c '{WRITE_DOCUMENT}' {result} {FAULT} {host.name}"],
        _if=needed,
    )
    local = Path(state.cwd or REPO_ROOT) / config["report_dir"] / "latest" / f"{host.name}.json"
    files.get(name="Fetch the smoke result to the control machine", src=result, dest=str(local),
              add_deploy_dir=False, create_local_dir=True)
    server.shell(
        name=SMOKE_CHECK,
        commands=[f"grep -q '\"status\": \"passed\"' {result} || {{ echo 'health check failed' >&2; exit 1; }}"],
        _if=needed,
    )


preflight()
if not refused():
    driver()
if not refused():
    cuda()
if not refused():
    python()
if not refused():
    health_standin()
