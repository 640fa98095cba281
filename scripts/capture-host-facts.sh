#!/usr/bin/env bash
# Capture the raw outputs gpufleet's facts parse, from a real host, into DIR (one file per probe).
#   scripts/capture-host-facts.sh DIR
set -u
dir=${1:?usage: scripts/capture-host-facts.sh DIR}
mkdir -p "$dir"
cap() { name=$1; shift; { "$@"; echo "rc=$?"; } >"$dir/$name.txt" 2>&1; }
cap os-release cat /etc/os-release
cap kernel-osrelease cat /proc/sys/kernel/osrelease
cap lspci-nn lspci -nn
cap nvidia-smi-query nvidia-smi --query-gpu=name,pci.device_id,compute_cap,driver_version --format=csv,noheader
cap nvidia-smi-query-pcie nvidia-smi --query-gpu=name,pcie.link.gen.current,pcie.link.width.current,power.limit --format=csv,noheader
cap proc-driver-nvidia-version cat /proc/driver/nvidia/version
cap modinfo-nvidia modinfo -F version nvidia
cap dpkg-nvidia sh -c "dpkg-query -W -f='\${Package} \${Version} \${db:Status-Abbrev}\n' 'nvidia-*' 'libnvidia-*' 'cuda-keyring' 'linux-modules-nvidia-*'"
cap mokutil mokutil --sb-state
cap meminfo sh -c 'cat /proc/meminfo; echo cpus=$(nproc)'
cap df sh -c 'df -Pk /var/lib'
cap uname-r uname -r
cap apt-mark-showhold apt-mark showhold
cap nvcc-version sh -c 'nvcc --version || /usr/local/cuda/bin/nvcc --version'
cap tools sh -c 'for t in apt-get dpkg-query tar sha256sum su sudo curl wget g++ make patch ccache cuobjdump lspci mokutil modinfo; do printf "%s " $t; command -v $t || echo MISSING; done'
cap python3 sh -c 'command -v python3; python3 -c "import sys, sysconfig, os; print(sys.version); inc = sysconfig.get_paths()[\"include\"]; print(inc, os.path.exists(inc + \"/Python.h\"))"; stat -c "%U %n" "$(dirname "$(dirname "$(command -v python3)")")"'
cap torch python3 -c "import json, torch; print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda, 'arch_list': torch.cuda.get_arch_list()}))"
cap pip-list sh -c 'python3 -m pip list 2>/dev/null | grep -i -E "^(pip|wheel|setuptools|ninja|torch|xformers|nvidia-ml-py) "'
