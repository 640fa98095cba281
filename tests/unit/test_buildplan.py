"""Pure build decisions: arch lists, compile jobs, the build script's command line."""

import json
import shlex

import pytest

from gpufleet.buildplan import (
    GIB,
    WheelBuild,
    arch_union,
    build_command,
    build_shell_command,
    finished_wheel,
    host_layout,
    max_jobs,
    normalise_arch_list,
    torch_cuda_arch_list,
)


def test_max_jobs_follows_memory_at_three_gib_a_job() -> None:
    assert max_jobs(10 * GIB, cpu_count=16) == 3


def test_max_jobs_never_exceeds_the_cpus() -> None:
    assert max_jobs(512 * GIB, cpu_count=8) == 8


def test_max_jobs_is_at_least_one_on_a_small_host() -> None:
    assert max_jobs(1 * GIB, cpu_count=4) == 1
    assert max_jobs(0, cpu_count=0) == 1


def test_max_jobs_honours_a_custom_budget() -> None:
    assert max_jobs(24 * GIB, cpu_count=32, per_job_gb=2) == 12


def test_max_jobs_refuses_a_zero_budget() -> None:
    with pytest.raises(ValueError):
        max_jobs(GIB, 2, per_job_gb=0)


def test_arch_union_merges_sorts_and_deduplicates() -> None:
    assert arch_union([["12.0"], ["9.0", "12.0"], None, [], ["8.6"]]) == ["8.6", "9.0", "12.0"]


def test_arch_union_sorts_numerically_not_as_text() -> None:
    assert arch_union([["12.0", "9.0", "10.0"]]) == ["9.0", "10.0", "12.0"]


def test_arch_list_accepts_torch_spellings() -> None:
    assert normalise_arch_list("12.0; 9.0a,8.6+ptx 12.0") == ["8.6+PTX", "9.0a", "12.0"]


def test_bad_arch_is_refused_with_its_value() -> None:
    with pytest.raises(ValueError, match="sm_120"):
        normalise_arch_list(["sm_120"])


def test_torch_cuda_arch_list_is_semicolon_joined() -> None:
    assert torch_cuda_arch_list(["12.0", "9.0"]) == "9.0;12.0"


def test_build_command_passes_every_input() -> None:
    build = WheelBuild(sdist="/w/xformers-0.0.35.tar.gz", sdist_sha256="ab" * 32, patch_dir="/w/patches",
                       arch_list=["12.0", "9.0"], max_jobs=4, python="/opt/venv/bin/python",
                       cuda_home="/usr/local/cuda-12.8", out_dir="/w/xformers/fp", fingerprint="fp", ccache=True)
    argv = build_command("/w/build_wheel.sh", build)
    options = dict(zip(argv[1::2], argv[2::2]))
    assert argv[0] == "/w/build_wheel.sh"
    assert options == {
        "--sdist": "/w/xformers-0.0.35.tar.gz", "--sha256": "ab" * 32, "--patch-dir": "/w/patches",
        "--arch-list": "9.0;12.0", "--max-jobs": "4", "--python": "/opt/venv/bin/python",
        "--cuda-home": "/usr/local/cuda-12.8", "--ccache": "1", "--out-dir": "/w/xformers/fp", "--fingerprint": "fp",
    }


def test_shell_command_quotes_the_arch_list() -> None:
    build = WheelBuild(sdist="s", sdist_sha256="h", patch_dir="p", arch_list=["9.0", "12.0"], max_jobs=1,
                       python="py", cuda_home="c", out_dir="o", fingerprint="f")
    assert "--arch-list '9.0;12.0'" in build_shell_command("b.sh", build)
    assert shlex.split(build_shell_command("b.sh", build)) == build_command("b.sh", build)


def test_host_layout_keeps_one_wheel_directory_per_fingerprint() -> None:
    a = host_layout("/var/lib/gpufleet/", "0.0.35", "aaaa")
    b = host_layout("/var/lib/gpufleet", "0.0.35", "bbbb")
    assert a.out_dir == "/var/lib/gpufleet/xformers/wheels/aaaa" and a.out_dir != b.out_dir
    assert a.manifest == "/var/lib/gpufleet/xformers/wheels/aaaa/manifest.json"
    # build_wheel.sh finds cubins.py beside itself when --cubins is not given.
    assert a.cubins_reader.rsplit("/", 1)[0] == a.script.rsplit("/", 1)[0]
    assert a.sdist == "/var/lib/gpufleet/xformers/xformers-0.0.35.tar.gz" and a.script == b.script


def test_finished_wheel_is_read_from_a_manifest_of_the_same_fingerprint() -> None:
    manifest = json.dumps({"fingerprint": "fp1", "wheel": "xformers-0.0.35-py39-none-linux_x86_64.whl",
                           "wheel_sha256": "a" * 64})
    assert finished_wheel(manifest, "fp1") == "xformers-0.0.35-py39-none-linux_x86_64.whl"


@pytest.mark.parametrize("manifest", [
    None, "", "{not json", "[]", json.dumps({"fingerprint": "fp0", "wheel": "x.whl"}),
], ids=["absent", "empty", "corrupt", "not-an-object", "other-fingerprint"])
def test_anything_but_a_finished_manifest_means_build(manifest: str) -> None:
    assert finished_wheel(manifest, "fp1") is None
