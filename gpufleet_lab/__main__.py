"""`python -m gpufleet_lab prepare|up|down|status`: build the cache, start, stop or show the test lab."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from gpufleet_lab.hardware import GPUS
from gpufleet_lab.lab import DEFAULT_DRIVER_VERSION, Lab, prepare
from gpufleet_lab.system import LabError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpufleet_lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="install the lab's Debian tools and fill /var/cache/gpufleet-lab")
    up = sub.add_parser("up", help="tear down leftovers, then start mirrors and N hosts")
    up.add_argument("-n", "--hosts", type=int, default=3)
    up.add_argument("--gpu", choices=sorted(GPUS), default="5090d", help="simulated GPU on every host")
    up.add_argument("--wsl", type=int, default=0, metavar="N", help="also start N WSL2-like hosts (group wsl)")
    up.add_argument("--inventory", type=Path, help="write the gpufleet YAML inventory here too")
    up.add_argument("--build-env", action="store_true",
                    help="give the hosts the real CUDA 13.0 toolkit and torch venv to build xformers (gpufleet_lab/buildenv.py)")
    up.add_argument("--systemd", action="store_true",
                    help="boot systemd as each host's PID 1 (it starts sshd), as on a real host")
    sub.add_parser("down", help="remove every lab process, mount, namespace and the bridge")
    sub.add_parser("status", help="print the lab's state as JSON")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the gpufleet lab needs root (network namespaces, mounts); run it with sudo", file=sys.stderr)
        return 2
    lab = Lab()
    try:
        if args.command == "prepare":
            started = time.monotonic()
            prepare()
            print(f"lab cache ready in {time.monotonic() - started:.1f} s")
        elif args.command == "up":
            started = time.monotonic()
            prepare()
            created = lab.up(args.hosts, [args.gpu] * args.hosts, build_env=args.build_env, systemd=args.systemd)
            created += [lab.add_host(gpu=args.gpu, platform="wsl") for _ in range(args.wsl)]
            extra = None
            if args.build_env:
                # build_settings accepts the existing driver: make it an open 580 module that is loaded.
                for host in created[:args.hosts]:
                    lab.set_loaded_driver(host, DEFAULT_DRIVER_VERSION.split("-")[0])
                extra = {**lab.build_settings(), "reboot_policy": "never"}
            inventory = lab.write_inventory_yaml(args.inventory or lab.state_dir / "inventory.yaml", settings=extra)
            print(f"{len(created)} lab hosts up in {time.monotonic() - started:.1f} s; inventory: {inventory}")
        elif args.command == "down":
            lab.down()
            print("lab is down")
        else:
            print(json.dumps(lab.status(), indent=1))
    except LabError as error:
        print(f"gpufleet lab: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
