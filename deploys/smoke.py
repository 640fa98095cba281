"""Stage 6, smoke: each host proves its own GPU with what was installed; the results make one fleet report.

The test runs again only when something it depends on changed (script, torch, xformers build, driver, on WSL2 the
Windows driver, heads) or no result exists yet; each host's JSON lands in <report_dir>/latest/<host>.json on this
machine (and, when the test ran, in <report_dir>/history/<run start, UTC>/), and the fleet table is printed when the
run ends. A failed rung fails that host, not the fleet.
Runs alone (after preflight): pyinfra inventory.py deploys/smoke.py
"""

import shlex
import shutil
from pathlib import Path

from pyinfra import host, state
from pyinfra.api import deploy
from pyinfra.facts.files import File
from pyinfra.operations import files, python, server

from deploys.preflight import preflight
from gpufleet.buildplan import ROOT_STATE_DIR
from gpufleet.decide import smoke_stamp, windows_driver
from gpufleet.fleet_report import history_run_name, print_report_when_run_ends
from gpufleet.layout import SMOKE_SCRIPT, cuda_home
from gpufleet.operations import make_directory, put_file
from gpufleet.rollout import SMOKE_CHECK
from gpufleet.settings import REPO_ROOT
from gpufleet.stage import as_user, lock_control_folder, profile, refuse_planted_links, run_alone, settings, stack_changed

def keep_in_history(src: Path, dest: Path) -> None:
    """Copy the fetched result into this run's history folder on the control machine."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)


@deploy("Smoke test")
def smoke() -> None:
    config = settings()
    work = f"{config['work_dir']}/smoke"
    user = config["build_user"]
    stamp = smoke_stamp(config, windows_driver(profile()))
    result = f"{work}/result-{stamp}.json"
    have_result = bool(host.get_fact(File, path=result))
    changed = stack_changed()
    needed = lambda: not have_result or changed()  # noqa: E731

    if refuse_planted_links([config["work_dir"], work, f"{work}/gpufleet_smoke.py"]):
        return
    make_directory(name="Create the smoke test directory", path=work, user=user, group=user, mode="755")
    put_file(
        name="Upload the smoke test",
        src=str(SMOKE_SCRIPT),
        dest=f"{work}/gpufleet_smoke.py",
        user=user,
        group=user,
        mode="644",
    )
    server.shell(
        name="Run the smoke test on this host's GPU",
        commands=[
            f"rm -f {shlex.quote(work)}/result-*.json {shlex.quote(work)}/result-*.rc; "
            + shlex.join([f"{config['venv_path']}/bin/python", f"{work}/gpufleet_smoke.py", "--output",
                          f"{result}.tmp", "--heads", str(config["smoke_heads"]), "--nvcc",
                          f"{cuda_home(config)}/bin/nvcc", "--host-label", host.name])
            + f"; echo $? > {shlex.quote(result[:-5] + '.rc')}; mv {shlex.quote(result + '.tmp')} {shlex.quote(result)}"
        ],
        **as_user(user),
        _if=needed,
    )
    reports = Path(state.cwd or REPO_ROOT) / config["report_dir"]
    local = reports / "latest" / f"{host.name}.json"
    lock_control_folder(reports)
    # Root copies the result into its own directory, reading it as the build user (root never opens a path of the
    # build user's tree), and fetches that copy; per stamp, so a killed run's missing copy is made by the next.
    staging = f"{ROOT_STATE_DIR}/smoke"
    staged = f"{staging}/result-{stamp}.json"
    have_staged = bool(host.get_fact(File, path=staged))
    read = shlex.quote(f"cat -- {shlex.quote(result)}")
    server.shell(
        name="Copy the smoke result into root's directory (read as the build user)",
        commands=[
            f"install -d -m 700 -o root -g root {shlex.quote(staging)} && "
            f"rm -f {shlex.quote(staging)}/result-*.json && "
            f"su -s /bin/sh -c {read} {shlex.quote(user)} > {shlex.quote(staged + '.new')} && "
            f"mv -f {shlex.quote(staged + '.new')} {shlex.quote(staged)}"
        ],
        _if=lambda: needed() or not have_staged,
    )
    files.get(
        name="Fetch the smoke result to the control machine",
        src=staged,
        dest=str(local),
        add_deploy_dir=False,
        create_local_dir=True,
    )
    # Only a run that tested keeps a copy (made when the run gets there), so a re-run stays zero changes.
    python.call(
        name="Keep the smoke result in the report history",
        function=keep_in_history,
        src=local,
        dest=reports / "history" / history_run_name() / f"{host.name}.json",
        _if=needed,
    )
    server.shell(
        name=SMOKE_CHECK,
        commands=[
            f'rc=$(cat {shlex.quote(result[:-5] + ".rc")}); [ "$rc" = 0 ] || {{ echo "smoke test failed (exit $rc); "'
            f'{shlex.quote(f"see {local} or run: gpufleet report {local.parent}")} >&2; exit 1; }}'
        ],
        _if=needed,
    )
    print_report_when_run_ends(local.parent)


run_alone(__file__, preflight, smoke)
