"""Built wheels through the cache host (gpufleet.cache, xformers_fleet.builder_for): the names, URLs and commands
the xformers stage uses with a fleet cache, and who builds. The upload and download themselves run in
tests/lab/test_cache_wheels.py against a real devpi-server."""

from __future__ import annotations

import json
import shlex
import subprocess

import pytest

from gpufleet import cache, facts
from gpufleet.buildplan import WHEEL_NAME, parse_manifest
from gpufleet.xformers_fleet import HostWheel, builder_for

WHEEL = "xformers-0.0.35-cp39-abi3-linux_x86_64.whl"
SHA = "ffcc6c710139a325a214778b111f61ac017b6fe9cdad7af3295df659dc0fa9dc"
FP = "9b22045d972df29c"
CONFIG = {"cache_pip_port": 3141}
# devpi-server 6.20.3's simple page for a private index holding one upload (captured from a real server).
SIMPLE_PAGE = (
    '<!DOCTYPE html><html lang="en"><head><title>root/gpufleet: links for xformers</title></head><body>'
    '<h1>root/gpufleet: links for xformers</h1>\n'
    f'root/gpufleet <a href="../../+f/ffc/c6c710139a325/{WHEEL}#sha256={SHA}" data-requires-python="">{WHEEL}</a>'
    '<br>\n</body></html>')


def test_the_index_name_carries_the_fingerprint_as_the_wheels_build_tag():
    name = cache.index_wheel_name(WHEEL, FP)
    assert name == f"xformers-0.0.35-0{FP}-cp39-abi3-linux_x86_64.whl"
    # Still a name the install command and the manifest checks accept, and the same version for devpi.
    assert WHEEL_NAME.fullmatch(name) and cache.wheel_version(name) == "0.0.35"
    # A fingerprint led by a letter still gives a build tag led by a digit (PEP 427).
    assert cache.index_wheel_name(WHEEL, "a" * 16).split("-")[2][0].isdigit()


@pytest.mark.parametrize("wheel, fp", [
    (f"xformers-0.0.35-0{FP}-cp39-abi3-linux_x86_64.whl", FP),  # already tagged
    ("xformers-0.0.35.tar.gz", FP),
    (WHEEL, "not-hex; rm -rf /"),
])
def test_index_name_refuses_what_is_no_plain_wheel_or_fingerprint(wheel, fp):
    with pytest.raises(ValueError):
        cache.index_wheel_name(wheel, fp)


def test_the_wheel_is_downloaded_from_devpis_sha256_path_on_the_cache_host():
    index = cache.wheel_index_url("10.213.50.13", CONFIG)
    assert index == "http://10.213.50.13:3141/root/gpufleet"
    assert cache.wheel_file_url(index, WHEEL, SHA) == f"{index}/+f/ffc/c6c710139a325/{WHEEL}"


@pytest.mark.parametrize("address", ["10.0.0.1/x", "host name", "a'b", ""])
def test_index_url_refuses_an_address_that_is_no_host(address):
    with pytest.raises(ValueError):
        cache.wheel_index_url(address, CONFIG)


def test_download_url_refuses_a_bad_name_or_checksum():
    with pytest.raises(ValueError):
        cache.wheel_file_url("http://c:3141/root/gpufleet", "../etc/passwd", SHA)
    with pytest.raises(ValueError):
        cache.wheel_file_url("http://c:3141/root/gpufleet", WHEEL, SHA[:-1] + "g")


def test_index_files_reads_name_and_sha256_from_devpis_simple_page():
    assert cache.index_files(SIMPLE_PAGE) == {WHEEL: SHA}
    assert facts.DevpiIndexFiles().process(SIMPLE_PAGE.splitlines()) == {WHEEL: SHA}
    # No server, no index or no project: curl -f prints nothing.
    assert facts.DevpiIndexFiles().process([]) == {}
    assert "index_url" not in facts.DevpiIndexFiles().command("http://c:3141/root/gpufleet")


def test_a_private_index_reads_as_wanted_only_when_it_inherits_nothing_and_only_the_uploader_uploads():
    def read(result):
        line = "root/gpufleet " + json.dumps({"type": "indexconfig", "result": result})
        return facts.DevpiMirrors().process([line])["root/gpufleet"]

    wanted = {"type": "stage", "bases": [], "volatile": False, "acl_upload": [cache.WHEEL_UPLOADER]}
    assert read(wanted) == cache.WHEEL_INDEX_STATE
    for changed in ({"bases": ["root/pypi"]}, {"volatile": True}, {"acl_upload": [":ANONYMOUS:"]}):
        assert read({**wanted, **changed}) != cache.WHEEL_INDEX_STATE, changed


def test_the_upload_password_reaches_curl_through_a_pipe_never_its_command_line(tmp_path):
    password = tmp_path / "password"
    password.write_text("c2VjcmV0LXBhc3N3b3Jk\n")
    manifest = json.dumps({"fingerprint": FP, "note": "a;type=text/x <file @file"})
    command = cache.upload_command("http://c:3141/root/gpufleet", str(password), f"/var/lib/x/{WHEEL}", manifest)
    assert "c2VjcmV0" not in command
    # What curl reads on stdin (-K -) is the config line with the password: run the part before the pipe.
    feeder = command.split(" | curl ", 1)[0]
    assert subprocess.run(["sh", "-c", feeder], capture_output=True, text=True).stdout == \
        'user = "gpufleet-upload:c2VjcmV0LXBhc3N3b3Jk"\n'
    argv = shlex.split(command.split(" | ", 1)[1])
    assert argv[:2] == ["curl", "-fsS"] and "-K" in argv and argv[argv.index("-K") + 1] == "-"
    # Text fields are literal (--form-string): the manifest cannot make curl read a file.
    assert f"description={manifest}" in argv and argv[argv.index(f"description={manifest}") - 1] == "--form-string"
    assert argv[-3:] == ["-F", f"content=@/var/lib/x/{WHEEL}", "http://c:3141/root/gpufleet/"]
    assert "version=0.0.35" in argv and "pyversion=cp39" in argv


def test_the_published_manifest_names_the_index_file_and_passes_the_manifest_checks():
    manifest = {"fingerprint": FP, "wheel": WHEEL, "wheel_sha256": SHA}
    published = dict(manifest, wheel=cache.index_wheel_name(WHEEL, FP), built_as=WHEEL)
    assert parse_manifest(json.dumps(published), FP) == published


def wheel(name: str, fp: str = FP, needs: bool = True, eligible: bool = True) -> HostWheel:
    return HostWheel(host=name, fingerprint=fp, arch_list=["12.0"], needs_install=needs, eligible=eligible)


def test_the_cache_host_builds_by_default_when_it_is_a_workstation_of_the_fleet():
    fleet = [wheel("ws1"), wheel("ws2"), wheel("cache1")]
    assert builder_for(FP, fleet, None, preferred="cache1") == "cache1"
    # Even when its own xformers is installed: it still holds the toolkit and torch (and may hold the build).
    assert builder_for(FP, [wheel("ws1"), wheel("cache1", needs=False)], None, preferred="cache1") == "cache1"


def test_the_configured_builder_comes_before_the_cache_host():
    assert builder_for(FP, [wheel("ws1"), wheel("ws2"), wheel("cache1")], "ws2", preferred="cache1") == "ws2"


@pytest.mark.parametrize("cache_host", [
    wheel("cache1", eligible=False),   # a cache-only host: no GPU stack, fails preflight
    wheel("cache1", fp="0" * 16),      # another Python, torch or arch list: another wheel
])
def test_without_the_toolkit_and_torch_for_this_wheel_the_first_host_that_needs_it_builds(cache_host):
    assert builder_for(FP, [wheel("ws1", needs=False), wheel("ws2"), cache_host], None, preferred="cache1") == "ws2"
