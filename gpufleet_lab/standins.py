"""STAND-IN packages with NVIDIA's real names and file layout, built locally for the lab's mirrors.

None of these contain NVIDIA software. They exist so the deploys' real commands (apt, dpkg-query, modinfo,
nvidia-smi, nvcc --version, pip, `import torch`) run against something with the right names, versions
and paths:

- `cuda-keyring` 1.1-1: the lab's test signing key at /usr/share/keyrings/cuda-archive-keyring.gpg and,
  like NVIDIA's, a .list pointing at NVIDIA's own URL for its repository directory.
- `cuda-toolkit-12-8`: /usr/local/cuda-12.8 with a `bin/nvcc` printing nvcc's `--version` format, lib64/.
- `nvidia-open-580` -> `nvidia-dkms-580-open` + `nvidia-utils-580`, and `nvidia-driver-pinning-580`; from branch
  590 on NVIDIA's unversioned names (`nvidia-open` -> `nvidia-dkms-open` + `nvidia-utils`) beside
  `nvidia-driver-pinning-<branch>`. Each branch's packages provide, conflict with and replace the same virtual
  packages, so apt itself removes the old branch during a branch change.
  The dkms stand-in's postinst installs a tiny ELF with a real `.modinfo` section as
  /lib/modules/$(uname -r)/updates/dkms/nvidia.ko and runs depmod, so `modinfo -F version nvidia` answers;
  like DKMS it builds nothing (and says so on stderr) when /lib/modules/$(uname -r)/build is missing.
  `nvidia-utils-580` ships a stand-in `nvidia-smi` (see nvidia_smi_standin.py). The dkms package also ships a
  stand-in `dkms` that does `dkms autoinstall -k <kernel>` the same way for any kernel with headers.
- `linux-image-<release>`: a stand-in kernel (/boot/vmlinuz-<release>, its /lib/modules tree), for kernel updates.
- `cuda`, `cuda-12-8`, `cuda-drivers` and `cuda-drivers-580`: empty metapackages with NVIDIA's dependency chain
  (cuda -> cuda-12-8 -> cuda-toolkit-12-8 + cuda-drivers -> a driver), which gpufleet must never install; they are
  in the repos so that a deploy asking for one would get it and a test would see it.
- `linux-headers-<this kernel>`: /usr/src/linux-headers-<kr> and the /lib/modules/<kr>/build link.
- a `torch` wheel 2.12.0.dev20260407+cu128: pure Python, exposing `__version__`, `version.cuda` and
  `cuda.get_arch_list()` with sm_120; no tensors, no CUDA.
Versions are parameters so a test can publish a driver update (580.95.05-1 -> 580.105.08-1).
"""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from gpufleet_lab.hardware import COMPUTE_APPS, GPUS
from gpufleet_lab.kmod_elf import modinfo_object

# A file in a package: content and mode; a str content starting with "->" is a symlink target.
Files = Mapping[str, tuple[bytes | str, int]]

SOURCE_DATE_EPOCH = "1767225600"  # fixed mtimes: rebuilding the same package gives the same bytes
TORCH_VERSION = "2.12.0.dev20260407+cu128"
TORCH_ARCH_LIST = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


def build_deb(out_dir: Path, name: str, version: str, files: Files, *, depends: str = "",
              description: str, arch: str = "amd64", scripts: Mapping[str, str] | None = None,
              relations: Mapping[str, str] | None = None) -> Path:
    """A .deb; `relations` adds control fields such as Conflicts, Replaces and Provides."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # dpkg would otherwise record / as 0700
        for path, (content, mode) in files.items():
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str) and content.startswith("->"):
                target.symlink_to(content[2:])
                continue
            target.write_bytes(content.encode() if isinstance(content, str) else content)
            target.chmod(mode)
        control = [f"Package: {name}", f"Version: {version}", f"Architecture: {arch}",
                   "Maintainer: gpufleet lab <lab@gpufleet.invalid>", "Priority: optional", "Section: misc"]
        if depends:
            control.append(f"Depends: {depends}")
        control.extend(f"{field}: {value}" for field, value in (relations or {}).items())
        control.append(f"Description: {description}\n gpufleet test-lab STAND-IN; contains no NVIDIA software.")
        (root / "DEBIAN").mkdir(exist_ok=True)
        (root / "DEBIAN" / "control").write_text("\n".join(control) + "\n")
        for script, body in (scripts or {}).items():
            (root / "DEBIAN" / script).write_text(body)
            (root / "DEBIAN" / script).chmod(0o755)
        out_dir.mkdir(parents=True, exist_ok=True)
        deb = out_dir / f"{name}_{version.split(':')[-1]}_{arch}.deb"
        env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
                       check=True, capture_output=True, env=env)
    return deb


def cuda_keyring_deb(out_dir: Path, keyring: bytes, repo_dir: str) -> Path:
    nvidia_url = f"https://developer.download.nvidia.com/compute/cuda/repos/{repo_dir}/x86_64/"
    return build_deb(out_dir, "cuda-keyring", "1.1-1", {
        "/usr/share/keyrings/cuda-archive-keyring.gpg": (keyring, 0o644),
        f"/etc/apt/sources.list.d/cuda-{repo_dir}-x86_64.list":
            (f"deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] {nvidia_url} /\n", 0o644),
    }, arch="all", description="NVIDIA CUDA archive keyring (lab test key)")


def nvcc_script(cuda_version: str, patch: str) -> str:
    return ("#!/bin/sh\n# gpufleet lab STAND-IN for nvcc: prints the real --version format, compiles nothing.\n"
            "case \"$*\" in *--version*|*-V*)\n"
            "echo 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
            "echo 'Copyright (c) 2005-2025 NVIDIA Corporation'\n"
            "echo 'Built on Fri_Feb_21_20:23:50_PST_2025'\n"
            f"echo 'Cuda compilation tools, release {cuda_version}, V{cuda_version}.{patch}'\n"
            f"echo 'Build cuda_{cuda_version}.r{cuda_version}/compiler.35583870_0'\n"
            "exit 0;;\nesac\necho 'nvcc (gpufleet lab stand-in): cannot compile' >&2\nexit 1\n")


def cuda_toolkit_deb(out_dir: Path, cuda_version: str = "12.8", patch: str = "93", payload: bytes = b"") -> Path:
    """The toolkit stand-in; `payload` (the benchmark's incompressible bytes) gives it a realistic size."""
    home = f"/usr/local/cuda-{cuda_version}"
    dashed = cuda_version.replace(".", "-")
    major = cuda_version.split(".")[0]
    return build_deb(out_dir, f"cuda-toolkit-{dashed}", f"{cuda_version}.1-1", {
        f"{home}/bin/nvcc": (nvcc_script(cuda_version, patch), 0o755),
        f"{home}/lib64/libcudart.so.{cuda_version}.90": (b"gpufleet lab stand-in, not a library\n", 0o644),
        f"{home}/lib64/libcudart.so.{major}": (f"->libcudart.so.{cuda_version}.90", 0),
        f"{home}/lib64/libcudart.so": (f"->libcudart.so.{major}", 0),
        f"{home}/include/cuda.h": (f"#define CUDA_VERSION {major}0{cuda_version.split('.')[1]}0\n", 0o644),
        f"{home}/version.json": (json.dumps({"cuda": {"name": "CUDA SDK", "version": f"{cuda_version}.1"}}), 0o644),
        **({f"{home}/lib64/libgpufleet_standin_payload.bin": (payload, 0o644)} if payload else {}),
    }, description=f"CUDA Toolkit {cuda_version} meta-package")


def nvidia_smi_script(upstream_version: str, wsl_device_id: int | None = None) -> str:
    """The stand-in nvidia-smi; with `wsl_device_id` it answers as WSL's /usr/lib/wsl/lib/nvidia-smi does."""
    template = (Path(__file__).parent / "nvidia_smi_standin.py").read_text()
    table = {f"{g.device_id:04x}": [g.name, g.memory_mib] for g in GPUS.values() if g is not None}
    return (template.replace("@DRIVER_VERSION@", upstream_version).replace("@GPUS@", json.dumps(table))
            .replace("@WSL_GPU@", json.dumps(wsl_device_id)).replace("@COMPUTE_APPS@", COMPUTE_APPS))


def dkms_postinst(upstream_version: str) -> str:
    return f"""#!/bin/sh
set -e
# gpufleet lab STAND-IN for a DKMS build: copies a prebuilt module object, needs the kernel headers like DKMS.
kver=$(uname -r)
case "$1" in configure)
  if [ ! -e "/lib/modules/$kver/build" ]; then
    echo "Error! Your kernel headers for kernel $kver cannot be found at /lib/modules/$kver/build" >&2
    echo "Please install the linux-headers-$kver package (gpufleet lab stand-in: module not installed)" >&2
    exit 0
  fi
  install -D -m 644 /usr/src/nvidia-{upstream_version}/nvidia.ko "/lib/modules/$kver/updates/dkms/nvidia.ko"
  depmod -a "$kver"
;; esac
"""


DKMS_PRERM = """#!/bin/sh
set -e
# Like DKMS on removal: the module goes from every kernel it was built for.
for module in /lib/modules/*/updates/dkms/nvidia.ko; do
  [ -e "$module" ] || continue
  rm -f "$module"
  kver=${module#/lib/modules/}; depmod -a "${kver%%/*}" || true
done
"""


def dkms_script(upstream_version: str) -> str:
    """`dkms autoinstall -k <kernel>` as the lab needs it: the prebuilt module object for that kernel, refused like
    DKMS when the kernel's headers are missing."""
    return f"""#!/bin/sh
# gpufleet lab STAND-IN for dkms: only `dkms autoinstall -k <kernel>`; copies a prebuilt object, compiles nothing.
set -e
if [ "$1" != autoinstall ] || [ "$2" != -k ] || [ -z "$3" ]; then
  echo "dkms (gpufleet lab stand-in): only 'dkms autoinstall -k <kernel>' is available" >&2; exit 2
fi
if [ ! -e "/lib/modules/$3/build" ]; then
  echo "Error! Your kernel headers for kernel $3 cannot be found at /lib/modules/$3/build" >&2; exit 1
fi
install -D -m 644 /usr/src/nvidia-{upstream_version}/nvidia.ko "/lib/modules/$3/updates/dkms/nvidia.ko"
depmod -a "$3"
"""


def linux_image_deb(out_dir: Path, kernel_release: str) -> Path:
    """A STAND-IN kernel package: /boot/vmlinuz-<release> (not a kernel) and its /lib/modules tree, no headers."""
    modules = f"/lib/modules/{kernel_release}"
    return build_deb(out_dir, f"linux-image-{kernel_release}", "1.0-1", {
        f"/boot/vmlinuz-{kernel_release}": (b"gpufleet lab stand-in, not a kernel\n", 0o644),
        **{f"{modules}/{name}": ("", 0o644)
           for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo")},
    }, description=f"Linux kernel image {kernel_release} (stand-in)")


# Virtual packages that make two driver branches mutually exclusive, as Ubuntu's and NVIDIA's driver packages do
# (each provides, conflicts with and replaces the same virtual name), so apt removes the old branch when the new one
# comes. The names follow Ubuntu's (nvidia-dkms-kernel, nvidia-driver-binary); the exact fields of NVIDIA's 590+
# packages are modelled, not copied.
EXCLUSIVE = {"dkms": "nvidia-dkms-kernel", "utils": "nvidia-utils-binary", "driver": "nvidia-driver-binary"}


def _exclusive(role: str, upstream: str) -> dict[str, str]:
    virtual = EXCLUSIVE[role]
    return {"Provides": f"{virtual} (= {upstream})", "Conflicts": virtual, "Replaces": virtual}


def driver_package_names(branch: str) -> dict[str, str]:
    """Stand-in names per role: up to 580 versioned (nvidia-open-580), from 590 on unversioned as at NVIDIA."""
    if int(branch) >= 590:
        return {"driver": "nvidia-open", "dkms": "nvidia-dkms-open", "utils": "nvidia-utils"}
    return {"driver": f"nvidia-open-{branch}", "dkms": f"nvidia-dkms-{branch}-open", "utils": f"nvidia-utils-{branch}"}


def driver_debs(out_dir: Path, branch: str = "580", version: str = "580.95.05-1") -> list[Path]:
    upstream = version.split("-")[0]
    names = driver_package_names(branch)
    module = modinfo_object({"version": upstream, "license": "Dual MIT/GPL", "name": "nvidia",
                             "description": "NVIDIA kernel module (gpufleet lab stand-in, not loadable)"})
    pin = (f"Package: nvidia-* libnvidia-* *nvidia*\nPin: version {branch}.*\nPin-Priority: 1000\n")
    return [
        build_deb(out_dir, f"nvidia-driver-pinning-{branch}", version, {
            f"/etc/apt/preferences.d/nvidia-driver-pinning-{branch}": (pin, 0o644)},
            arch="all", description=f"Pin the NVIDIA driver to branch {branch}"),
        build_deb(out_dir, names["dkms"], version, {
            f"/usr/src/nvidia-{upstream}/nvidia.ko": (module, 0o644),
            "/usr/sbin/dkms": (dkms_script(upstream), 0o755)},
            depends="kmod", scripts={"postinst": dkms_postinst(upstream), "prerm": DKMS_PRERM},
            relations=_exclusive("dkms", upstream), description="NVIDIA open kernel module source (DKMS)"),
        build_deb(out_dir, names["utils"], version, {
            "/usr/bin/nvidia-smi": (nvidia_smi_script(upstream), 0o755)},
            depends="python3", relations=_exclusive("utils", upstream),
            description="NVIDIA driver support binaries"),
        build_deb(out_dir, names["driver"], version, {},
                  depends=f"{names['dkms']} (= {version}), {names['utils']} (= {version})",
                  relations=_exclusive("driver", upstream),
                  description=f"NVIDIA open driver metapackage, branch {branch}"),
    ]


def cuda_metapackage_debs(out_dir: Path, branch: str = "580", driver_version: str = "580.95.05-1") -> list[Path]:
    """`cuda`, `cuda-12-8`, `cuda-drivers` and `cuda-drivers-<branch>`: the metapackages that pull a driver."""
    return [
        build_deb(out_dir, f"cuda-drivers-{branch}", driver_version, {}, depends=f"nvidia-utils-{branch}",
                  description=f"CUDA driver metapackage, branch {branch} (proprietary flavour at NVIDIA)"),
        build_deb(out_dir, "cuda-drivers", driver_version, {}, depends=f"cuda-drivers-{branch}",
                  description="CUDA driver metapackage"),
        build_deb(out_dir, "cuda-12-8", "12.8.1-1", {}, depends="cuda-toolkit-12-8, cuda-drivers",
                  description="CUDA 12.8 metapackage: toolkit and driver"),
        build_deb(out_dir, "cuda", "12.8.1-1", {}, depends="cuda-12-8", description="CUDA metapackage (newest)"),
    ]


def linux_headers_deb(out_dir: Path, kernel_release: str) -> Path:
    src = f"/usr/src/linux-headers-{kernel_release}"
    return build_deb(out_dir, f"linux-headers-{kernel_release}", "1.0-1", {
        f"{src}/Makefile": (f"# gpufleet lab stand-in headers for {kernel_release}\n", 0o644),
        f"{src}/include/generated/utsrelease.h": (f'#define UTS_RELEASE "{kernel_release}"\n', 0o644),
        f"/lib/modules/{kernel_release}/build": (f"->{src}", 0),
    }, description=f"Linux kernel headers for {kernel_release}")


def torch_wheel(out_dir: Path, version: str = TORCH_VERSION, payload: bytes = b"") -> Path:
    """The torch stand-in; `payload` (the benchmark's incompressible bytes) gives it a realistic size."""
    cuda = version.split("+cu")[1] if "+cu" in version else None
    cuda_dotted = f"{cuda[:-1]}.{cuda[-1]}" if cuda else None
    sources = {
        "torch/__init__.py": (f'"""gpufleet lab STAND-IN for torch: metadata only, no tensors, no CUDA."""\n'
                              f"from torch import cuda, version\n__version__ = {version!r}\n"),
        "torch/version.py": f"__version__ = {version!r}\ncuda = {cuda_dotted!r}\ngit_version = 'gpufleet-lab'\n",
        "torch/cuda/__init__.py": (f"def get_arch_list():\n    return {TORCH_ARCH_LIST!r}\n\n\n"
                                   "def is_available():\n    return False\n\n\n"
                                   "def device_count():\n    return 0\n"),
    }
    dist_info = f"torch-{version}.dist-info"
    meta = {
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n"
                                 "Summary: gpufleet lab stand-in for PyTorch\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: gpufleet-lab\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist_info}/top_level.txt": "torch\n",
    }
    entries: dict[str, str | bytes] = {**sources, **meta}
    if payload:
        entries["torch/lib/libgpufleet_standin_payload.bin"] = payload
    raw = {path: body.encode() if isinstance(body, str) else body for path, body in entries.items()}
    record = [f"{path},sha256={_urlsafe_digest(body)},{len(body)}" for path, body in raw.items()]
    record.append(f"{dist_info}/RECORD,,")
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"torch-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, body in {**raw, f"{dist_info}/RECORD": ("\n".join(record) + "\n").encode()}.items():
            info = zipfile.ZipInfo(path, date_time=(2026, 4, 7, 0, 0, 0))
            info.external_attr = 0o644 << 16
            # Random bytes do not compress: store them rather than spend a CPU minute deflating them.
            info.compress_type = zipfile.ZIP_STORED if path.endswith(".bin") else zipfile.ZIP_DEFLATED
            zf.writestr(info, body)
    return wheel


def _urlsafe_digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def replace_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
