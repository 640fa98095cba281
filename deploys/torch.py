"""Stage 4, torch: one exact torch build in the venv, the same on every host, validated against the host's GPUs.

Runs alone (after preflight): pyinfra inventory.py deploys/torch.py
"""

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.operations import server

from deploys.preflight import preflight
from gpufleet import facts
from gpufleet.decide import HostProfile, arch_list, torch_install_args, torch_problems
from gpufleet.operations import check_torch, pip_packages
from gpufleet.stage import (
    as_user,
    profile,
    record_stack_change,
    refuse_host,
    run_alone,
    settings,
    venv_owner,
    warn_once,
)

FROZEN_CU128_NOTICE = (
    "torch: PyTorch stopped publishing CUDA 12.8 nightlies in April 2026; gpufleet pins the last one "
    "(torch_version). To move on, use a cu130 build with cuda_version 13.0 and a 580+ driver (README)."
)


@deploy("PyTorch")
def torch() -> None:
    config = settings()
    me = profile()
    if config["torch_version"].endswith("+cu128") and config["torch_channel"] == "nightly":
        warn_once(FROZEN_CU128_NOTICE)
    python = f"{config['venv_path']}/bin/python"
    archs = config["xformers_arch_list"] or arch_list(me.gpus)
    context = torch_state_context(me)
    info = host.get_fact(facts.TorchInfo, python=python, context=context)
    if info is not None and info["version"] == config["torch_version"]:
        problems = torch_problems(info, config["cuda_version"], arch_list(me.gpus))
        if problems:
            refuse_host(problems)
        elif not info["stamped"]:
            # Planned only when the stamp is missing or stale, so a no-op run neither imports torch nor changes.
            server.shell(
                name="Record the validated torch (its files, interpreter, GPUs and driver)",
                commands=[facts.record_torch_state_command(python, context)],
            )
        return
    # pip lists torch at the pinned version yet it does not import: an install killed midway; pip would skip it.
    listed = (host.get_fact(facts.PipFreeze, python=python) or {}).get("torch")
    broken = info is None and listed is not None
    install = pip_packages(
        name=f"Install torch {config['torch_version']}" + (f" again (torch {listed} does not import)" if broken else ""),
        packages=[f"torch=={config['torch_version']}"],
        python=python,
        extra_args=torch_install_args(config) + (" --force-reinstall --no-deps" if broken else ""),
        reinstall=broken,
        **as_user(venv_owner(config)),
    )
    record_stack_change(install)
    check_torch(
        name=f"Check torch's CUDA version and GPU architectures ({', '.join(archs)})",
        python=python,
        cuda_version=config["cuda_version"],
        archs=arch_list(me.gpus),
        context=context,
        _if=install.did_change,
    )


def torch_state_context(me: HostProfile) -> str:
    """What, besides the venv, a validated torch state depends on: the GPUs' PCI IDs and the driver version."""
    driver = me.driver.loaded.version if me.driver.loaded else next((g.driver_version for g in me.smi.gpus), "none")
    return f"gpus={','.join(sorted(g.device_id for g in me.gpus)) or 'none'} driver={driver}"


run_alone(__file__, preflight, torch)
