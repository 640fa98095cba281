"""Kernel updates: which kernels lack the NVIDIA module, the running kernel's flavour, Ubuntu's per-flavour modules."""

import subprocess

import pytest

from gpufleet.decide import driver_packages, kernel_flavour, kernels_without_module
from gpufleet.facts import InstalledKernel, InstalledKernels, ParseError, parse_kernels

KERNELS = """== running
6.8.0-88-generic
== kernels
6.8.0-88-generic headers=yes nvidia=580.95.05
6.8.0-90-generic headers=no nvidia=-
== meta
linux-image-generic
linux-headers-generic
"""


def test_kernel_state_lists_every_kernel_with_headers_and_module():
    state = parse_kernels(KERNELS)
    assert state.kernels == [InstalledKernel("6.8.0-88-generic", True, True, "580.95.05"),
                             InstalledKernel("6.8.0-90-generic", False, False, None)]
    assert state.metapackages == ["linux-headers-generic", "linux-image-generic"]


@pytest.mark.parametrize("bad", [
    "== running\n6.8.0-88-generic\n== kernels\n6.8.0-90-generic headers=no nvidia=-\n",  # running kernel missing
    "== running\n6.8.0-88-generic\n== kernels\n6.8.0-88-generic; reboot headers=no nvidia=-\n",
    "== running\n$(reboot)\n== kernels\n",
])
def test_unexpected_kernel_output_fails_the_host_not_the_run(bad):
    with pytest.raises(ParseError):
        parse_kernels(bad)


def test_kernel_fact_command_runs_here_and_finds_the_running_kernel():
    out = subprocess.run(["sh", "-c", InstalledKernels().command()], capture_output=True, text=True, check=True)
    state = parse_kernels(out.stdout)
    running = subprocess.run(["uname", "-r"], capture_output=True, text=True, check=True).stdout.strip()
    assert [k.release for k in state.kernels if k.running] == [running]


@pytest.mark.parametrize("release, meta, flavour", [
    ("6.8.0-88-generic", ["linux-image-generic"], "generic"),
    ("6.14.0-36-generic", ["linux-image-generic-hwe-24.04", "linux-headers-generic-hwe-24.04"], "generic-hwe-24.04"),
    ("6.8.0-1012-lowlatency", [], "lowlatency"),
    ("6.11.0-1008-lowlatency", ["linux-image-lowlatency-hwe-24.04"], "lowlatency-hwe-24.04"),
    ("6.1.0-28-amd64", ["linux-image-amd64"], "amd64"),
    ("6.1.0-28-cloud-amd64", [], "cloud-amd64"),
    ("6.18.44-fc-v1045", [], None),  # a custom kernel names no flavour: no metapackage to follow
])
def test_kernel_flavour_follows_the_installed_metapackages(release, meta, flavour):
    assert kernel_flavour(release, meta) == flavour


def test_ubuntu_signed_modules_are_the_running_flavours():
    assert driver_packages("ubuntu", "595", "open", "generic-hwe-24.04") == [
        "nvidia-driver-595-open", "linux-modules-nvidia-595-open-generic-hwe-24.04"]
    assert driver_packages("ubuntu", "580", "open")[1] == "linux-modules-nvidia-580-open-generic"


def test_a_kernel_without_the_branchs_module_needs_one():
    kernels = [InstalledKernel("a", True, True, "580.95.05"), InstalledKernel("b", False, True, None),
               InstalledKernel("c", False, True, "595.45.04")]
    assert kernels_without_module(kernels, "580") == ["b", "c"]
    assert kernels_without_module(kernels, "595") == ["a", "b"]
