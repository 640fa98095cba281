"""Stage 6, smoke: each host proves its own GPU with what was installed; the results make one fleet report.

The test runs again only when something it depends on changed (script, torch, xformers build, driver, heads)
or no result exists yet; each host's JSON lands in <report_dir>/latest/<host>.json on this machine, and the fleet
table is printed when the run ends. A failed rung fails that host, not the fleet.
Runs alone (after preflight): pyinfra inventory.py deploys/smoke.py
"""

import hashlib
from pathlib import Path

from pyinfra import host, state
from pyinfra.api import deploy
from pyinfra.facts.files import File
from pyinfra.operations import files, server

from deploys.cuda import cuda_home
from deploys.preflight import preflight
from gpufleet.fleet_report import print_report_when_run_ends
from gpufleet.settings import REPO_ROOT
from gpufleet.stage import as_user, lock_control_folder, run_alone, settings, stack_changed

SCRIPT = REPO_ROOT / "files" / "smoke" / "gpufleet_smoke.py"


def smoke_stamp(config: dict) -> str:
    """The desired stack the result belongs to: script, driver branch, CUDA, torch, xformers source, heads.

    Only settings go in, so a run after a successful one computes the same stamp; changes made during a run
    (install, reboot) trigger the test through stack_changed() instead.
    """
    digest = hashlib.sha256(SCRIPT.read_bytes())
    for key in ("driver_branch", "cuda_version", "torch_version", "xformers_source_sha256", "smoke_heads"):
        digest.update(b"\0" + str(config[key]).encode())
    return digest.hexdigest()[:16]


@deploy("Smoke test")
def smoke() -> None:
    config = settings()
    work = f"{config['work_dir']}/smoke"
    user = config["build_user"]
    stamp = smoke_stamp(config)
    result = f"{work}/result-{stamp}.json"
    have_result = bool(host.get_fact(File, path=result))
    changed = stack_changed()
    needed = lambda: not have_result or changed()  # noqa: E731

    files.directory(name="Create the smoke test directory", path=work, user=user, group=user, mode="755")
    files.put(
        name="Upload the smoke test",
        src=str(SCRIPT),
        dest=f"{work}/gpufleet_smoke.py",
        user=user,
        group=user,
        mode="644",
    )
    server.shell(
        name="Run the smoke test on this host's GPU",
        commands=[
            f"rm -f {work}/result-*.json {work}/result-*.rc; "
            f"{config['venv_path']}/bin/python {work}/gpufleet_smoke.py --output {result}.tmp "
            f"--heads {config['smoke_heads']} --nvcc {cuda_home(config)}/bin/nvcc --host-label {host.name}; "
            f"echo $? > {result[:-5]}.rc; mv {result}.tmp {result}"
        ],
        **as_user(user),
        _if=needed,
    )
    local = Path(state.cwd or REPO_ROOT) / config["report_dir"] / "latest" / f"{host.name}.json"
    lock_control_folder(local.parent.parent)
    files.get(
        name="Fetch the smoke result to the control machine",
        src=result,
        dest=str(local),
        add_deploy_dir=False,
        create_local_dir=True,
    )
    server.shell(
        name="Check that every rung of the smoke test passed",
        commands=[
            f'rc=$(cat {result[:-5]}.rc); [ "$rc" = 0 ] || {{ echo "smoke test failed (exit $rc); '
            f'see {local} or run: gpufleet report {local.parent}" >&2; exit 1; }}'
        ],
        _if=needed,
    )
    print_report_when_run_ends(local.parent)


run_alone(__file__, preflight, smoke)
