"""The two cubin readers: cuobjdump's listing and the ELF fatbin reader, on real nvcc output."""

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import cannot_run
from tests.host_scripts import cubins

DeviceCode, FatbinError, main = cubins.DeviceCode, cubins.FatbinError, cubins.main
missing_cubins, requested_cubins = cubins.missing_cubins, cubins.requested_cubins
parse_cuobjdump_listing, read_elf_device_code = cubins.parse_cuobjdump_listing, cubins.read_elf_device_code

DATA = Path(__file__).parent / "data" / "cuda"
# Fixture -> (cubins, ptx) as cuobjdump 13.5 names them; the libraries come from nvcc 13.0 (make_fixtures.sh).
EXPECTED = {
    "sm90_sm120": (("sm_90", "sm_120"), ()),
    "sm90a_ptx120": (("sm_90a",), ("sm_120",)),
    "compressed_sm100a_sm120": (("sm_100a", "sm_120"), ()),
    "sm120a_sm120f_sm100f": (("sm_100", "sm_120", "sm_120a"), ()),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cuobjdump_listing_gives_cubin_and_ptx_archs(name: str) -> None:
    code = parse_cuobjdump_listing((DATA / f"{name}.cuobjdump.txt").read_text())
    assert (code.cubins, code.ptx) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_elf_reader_agrees_with_cuobjdump(name: str) -> None:
    code = read_elf_device_code((DATA / f"{name}.so").read_bytes())
    assert (code.cubins, code.ptx) == EXPECTED[name]


def test_listing_of_our_xformers_build_shows_only_sm120() -> None:
    # Captured from the _C.so of `python -m gpufleet_lab.ci_build` (TORCH_CUDA_ARCH_LIST=12.0, nvcc 13.0): 11 cubins.
    text = (DATA / "xformers-0.0.35-sm120-C.so.cuobjdump.txt").read_text()
    assert parse_cuobjdump_listing(text) == DeviceCode(cubins=("sm_120",))
    assert text.count(".sm_120.cubin") == 11


def test_listing_ignores_other_lines() -> None:
    text = "cuobjdump info    : File 'x.so' does not contain device code\n\nFatbin elf code:\n"
    assert parse_cuobjdump_listing(text) == DeviceCode()


def test_non_elf_file_is_refused() -> None:
    with pytest.raises(FatbinError, match="not an ELF"):
        read_elf_device_code(b"#!/bin/sh\necho not a library\n")


def test_library_without_fatbin_has_no_device_code() -> None:
    assert read_elf_device_code(Path(shutil.which("sh") or "/bin/sh").resolve().read_bytes()) == DeviceCode()


def test_requested_archs_map_to_cubin_names() -> None:
    assert requested_cubins(["12.0", "9.0a", "8.6+PTX", "12.0"]) == ("sm_86", "sm_90a", "sm_120")


def test_ptx_does_not_count_as_a_cubin() -> None:
    code = read_elf_device_code((DATA / "sm90a_ptx120.so").read_bytes())
    assert missing_cubins(code, ["12.0"]) == ("sm_120",)


def test_arch_specific_cubin_does_not_satisfy_a_plain_request() -> None:
    code = read_elf_device_code((DATA / "sm90a_ptx120.so").read_bytes())
    assert missing_cubins(code, ["9.0"]) == ("sm_90",)
    assert missing_cubins(code, ["9.0a"]) == ()


def test_cli_fails_naming_the_missing_arch(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--no-cuobjdump", "--require", "9.0;12.0", str(DATA / "sm90a_ptx120.so")]) == 1
    assert "no cubin for sm_90, sm_120" in capsys.readouterr().err


def test_cli_passes_when_every_arch_has_a_cubin() -> None:
    assert main(["--no-cuobjdump", "--require", "9.0,12.0", str(DATA / "sm90_sm120.so")]) == 0


def test_freshly_compiled_library_reads_back_its_archs(tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda-13.0/bin/nvcc"
    if not Path(nvcc).exists():
        cannot_run("no nvcc on PATH or in /usr/local/cuda-13.0 (this machine kind ships CUDA 13.0 there)")
    lib = tmp_path / "k.so"
    subprocess.run([nvcc, "-Xcompiler", "-fPIC", "-shared", "-cudart", "shared",
                    "-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_120,code=sm_120",
                    "-o", str(lib), str(DATA / "tiny.cu")], check=True)
    assert read_elf_device_code(lib.read_bytes()).cubins == ("sm_90", "sm_120")
