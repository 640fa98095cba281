"""The wheel fingerprint changes with every input that changes the wheel, and only with those."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpufleet.fingerprint import Patch, WheelInputs, fingerprint, read_patch_series

REPO = Path(__file__).resolve().parents[2]
BASE = WheelInputs(
    xformers_version="0.0.35",
    source_sha256="f7fc183a58e4bf0e2ae339a18fb1b1d4a37854c0f2545b4f360fef001646ab76",
    patches=(Patch("0001-a.patch", b"--- a\n+++ b\n"), Patch("0002-b.patch", b"--- c\n+++ d\n")),
    torch_version="2.12.0.dev20260407+cu128",
    cuda_version="12.8",
    python_version="3.12",
    arch_list=("12.0",),
)


@pytest.mark.parametrize("change", [
    {"xformers_version": "0.0.36"},
    {"source_sha256": "0" * 64},
    {"patches": (Patch("0001-a.patch", b"--- a\n+++ B\n"), BASE.patches[1])},
    {"patches": (BASE.patches[0],)},
    {"patches": (Patch("0001-renamed.patch", BASE.patches[0].content), BASE.patches[1])},
    {"torch_version": "2.12.0.dev20260408+cu128"},
    {"cuda_version": "13.0"},
    {"python_version": "3.11"},
    {"arch_list": ("9.0", "12.0")},
], ids=lambda change: next(iter(change)))
def test_each_input_changes_the_fingerprint(change: dict) -> None:
    assert fingerprint(dataclasses.replace(BASE, **change)) != fingerprint(BASE)


def test_patch_order_changes_the_fingerprint() -> None:
    assert fingerprint(dataclasses.replace(BASE, patches=BASE.patches[::-1])) != fingerprint(BASE)


def test_arch_order_and_duplicates_do_not_change_it() -> None:
    a = dataclasses.replace(BASE, arch_list=("12.0", "9.0", "12.0"))
    b = dataclasses.replace(BASE, arch_list=(" 9.0", "12.0"))
    assert fingerprint(a) == fingerprint(b)


def test_patch_releases_of_python_and_cuda_do_not_change_it() -> None:
    assert fingerprint(dataclasses.replace(BASE, python_version="3.12.3", cuda_version="12.8.93")) == fingerprint(BASE)


def test_fingerprint_is_the_same_in_every_process_and_safe_in_a_path() -> None:
    """It names the wheel's folders on this machine and on hosts, compared across runs: another interpreter, with
    another hash seed, computes the same 16 lowercase hex digits."""
    code = "from tests.unit.test_fingerprint import BASE; from gpufleet.fingerprint import fingerprint; print(fingerprint(BASE))"
    for seed in ("0", "4242"):
        other = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONHASHSEED": seed},
                               capture_output=True, text=True, check=True)
        assert other.stdout.strip() == fingerprint(BASE)
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint(BASE))


def test_series_is_read_in_order_with_contents(tmp_path: Path) -> None:
    (tmp_path / "b.patch").write_text("B")
    (tmp_path / "a.patch").write_text("A")
    (tmp_path / "series").write_text("# order matters\nb.patch\n\na.patch  # second\n")
    assert read_patch_series(tmp_path) == [Patch("b.patch", b"B"), Patch("a.patch", b"A")]


def test_series_naming_a_missing_patch_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "series").write_text("0001-gone.patch\n")
    with pytest.raises(FileNotFoundError, match="0001-gone.patch"):
        read_patch_series(tmp_path)


def test_shipped_series_holds_the_cutlass_cap_patch() -> None:
    names = [p.name for p in read_patch_series(REPO / "files/patches/xformers-0.0.35")]
    assert names == ["0001-cutlass-pt-allow-sm120.patch"]
