"""The fleet cache's decisions: where pip and apt go with and without a cache, the servers' configuration, and
hit/miss statistics read from the servers' own logs."""

from __future__ import annotations

from gpufleet import cache, cache_stats, facts
from gpufleet.settings import load_settings

DEFAULTS = {name: s.default for name, s in load_settings().items()}


def test_without_a_cache_settings_are_unchanged():
    assert cache.through_cache(dict(DEFAULTS), None) == DEFAULTS


def test_with_a_cache_both_pip_indexes_are_the_caches_devpi_mirrors():
    view = cache.through_cache(dict(DEFAULTS), "10.0.0.5")
    assert view["pip_index_url"] == "http://10.0.0.5:3141/root/pypi/+simple/"
    assert view["torch_index_url"] == "http://10.0.0.5:3141/root/pytorch/+simple/"
    assert view["pip_trusted_hosts"] == ["10.0.0.5"]
    assert view["torch_version"] == DEFAULTS["torch_version"]


def test_cache_mirrors_pypi_and_the_torch_index_by_default():
    assert cache.mirror_urls(DEFAULTS) == {"root/pypi": "https://pypi.org/simple/",
                                           "root/pytorch": DEFAULTS["torch_index_url"]}


def test_one_upstream_for_both_indexes_gives_one_mirror():
    config = {**DEFAULTS, "pip_index_url": "http://10.0.0.1:8047/simple", "torch_index_url": "http://10.0.0.1:8047/simple/",
              "pip_trusted_hosts": ["10.0.0.1"]}
    assert cache.mirror_urls(config) == {"root/pypi": "http://10.0.0.1:8047/simple"}
    view = cache.through_cache(config, "10.0.0.5")
    assert view["torch_index_url"] == view["pip_index_url"] == "http://10.0.0.5:3141/root/pypi/+simple/"
    assert view["pip_trusted_hosts"] == ["10.0.0.1", "10.0.0.5"]


def test_servers_listen_on_the_hosts_address_and_loopback_unless_told():
    assert cache.listen_addresses(DEFAULTS, "10.0.0.5") == ["10.0.0.5", "127.0.0.1"]
    assert cache.listen_addresses({**DEFAULTS, "cache_listen": ["192.168.1.2", "127.0.0.1"]}, "10.0.0.5") == [
        "192.168.1.2", "127.0.0.1"]


def test_acng_config_binds_the_allowed_addresses_and_allows_the_mirrors_ports():
    config = {**DEFAULTS, "cuda_repo_url": "http://10.0.0.1:8047/cuda/repos", "cache_dir": "/srv/c"}
    text = cache.acng_config(config, ["10.0.0.5", "127.0.0.1"])
    assert "BindAddress: 10.0.0.5 127.0.0.1\n" in text
    assert "CacheDir: /srv/c/apt\n" in text and "Port: 3142\n" in text
    assert "AllowUserPorts: 80 8047\n" in text


def test_acng_allows_the_ports_of_the_fleets_own_http_apt_sources_but_not_the_caches_remap():
    # An internal OS mirror at :8080 in the hosts' sources.list is no gpufleet setting, but apt asks the proxy for it.
    sources = ["http://10.0.0.1:8080/debian", "https://10.0.0.2:8443/x", "http://10.0.0.5:3142/gpufleet-cuda",
               "http://127.0.0.1:3142/gpufleet-cuda", "http://deb.debian.org/debian", "http://10.0.0.3:99999/bad"]
    text = cache.acng_config(DEFAULTS, ["10.0.0.5", "127.0.0.1"], sources)
    assert "AllowUserPorts: 80 8080\n" in text


def test_apt_dropin_names_the_proxy_for_http_and_https():
    text = cache.apt_proxy_dropin(DEFAULTS, "10.0.0.5")
    assert text == ('Acquire::http::Proxy "http://10.0.0.5:3142";\nAcquire::https::Proxy "http://10.0.0.5:3142";\n'
                    'Acquire::http::Proxy::10.0.0.5 "DIRECT";\n')


def test_cuda_repository_is_read_through_the_caches_remap_of_cuda_repo_url():
    view = cache.through_cache(dict(DEFAULTS), "10.0.0.5")
    assert view["cuda_repo_url"] == "http://10.0.0.5:3142/gpufleet-cuda"
    text = cache.acng_config(DEFAULTS, ["10.0.0.5"])
    assert "Remap-gpufleet-cuda: /gpufleet-cuda ; https://developer.download.nvidia.com/compute/cuda/repos\n" in text


def test_devpi_listens_on_each_allowed_address():
    command = cache.devpi_command("/opt/v", {**DEFAULTS, "cache_dir": "/srv/c"}, ["10.0.0.5", "127.0.0.1"])
    assert command[-7:] == ["/opt/v/bin/devpi-server", "--serverdir", "/srv/c/pypi",
                            "--listen", "10.0.0.5:3141", "--listen", "127.0.0.1:3141"]


def test_devpi_verifies_https_upstreams_against_the_hosts_trust_store_not_certifis():
    # devpi-server's httpx client takes requests' certifi bundle unless REQUESTS_CA_BUNDLE names another: an
    # internal CA installed with update-ca-certificates would be refused. Never switched off, only redirected.
    command = cache.devpi_command("/opt/v", DEFAULTS, ["127.0.0.1"])
    assert command[:2] == ["env", "REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt"]
    assert not any("verify" in part.lower() or "insecure" in part.lower() for part in command)


def test_apt_warm_covers_driver_toolkit_venv_build_tools_and_each_kernels_headers():
    config = {**DEFAULTS, "driver_branch": "590", "cuda_version": "13.0", "xformers_ccache": True}
    packages = cache.apt_warm_packages(config, ["6.8.0-45-generic", "6.1.0-26-amd64"])
    assert {"nvidia-driver-pinning-590", "nvidia-open", "cuda-toolkit-13-0", "python3-venv",
            f"python{DEFAULTS['python_version']}-dev", "g++", "make", "patch", "ccache",
            "linux-headers-6.8.0-45-generic", "linux-headers-6.1.0-26-amd64"} == set(packages)


def test_xformers_sdist_comes_from_devpis_pypi_mirror_by_its_pinned_sha256():
    view = cache.through_cache(dict(DEFAULTS), "10.0.0.5")
    assert view["xformers_source_url"] == (
        "http://10.0.0.5:3141/root/pypi/+f/f7f/c183a58e4bf0e/xformers-0.0.35.tar.gz")
    assert view["xformers_source_sha256"] == DEFAULTS["xformers_source_sha256"]


ACNG_LOG = """\
1795828060|I|4500|10.0.0.11|debian/./tree_2.1.0-1_amd64.deb
1795828060|O|4620|10.0.0.11|debian/./tree_2.1.0-1_amd64.deb
1795828061|O|4620|10.0.0.12|debian/./tree_2.1.0-1_amd64.deb
1795828061|O|4620|10.0.0.13|debian/./tree_2.1.0-1_amd64.deb
"""


def test_acng_counts_a_fetched_file_as_one_miss_and_the_rest_as_hits():
    stats = cache_stats.acng_stats(ACNG_LOG + "not a transfer line\n")
    assert (stats.hits, stats.misses, stats.bytes_served, stats.bytes_fetched) == (2, 1, 13860, 4500)
    assert stats.bytes_saved == 9360


def test_acng_counts_an_index_file_fetched_again_for_each_client_as_misses():
    log = ("1795829418|I|367893|10.0.0.11|m/debian/Packages\n1795829418|O|367735|10.0.0.11|m/debian/Packages\n"
           "1795829418|I|367893|10.0.0.12|m/debian/Packages\n1795829418|O|367735|10.0.0.12|m/debian/Packages\n")
    stats = cache_stats.acng_stats(log)
    assert (stats.hits, stats.misses, stats.bytes_saved) == (0, 2, 0)


DEVPI_LOG = """\
2026-11-28 01:07:40,418 INFO  [req12] GET /root/p2/+f/65a/24341b5ac09fc/ninja-1.13.2-py3-none-any.whl
2026-11-28 01:07:40,422 INFO  [req12] [Rtx4] reading remote: URL('http://127.0.0.1:18047/packages/ninja-1.13.2-py3-none-any.whl'), target root/p2/+f/65a/24341b5ac09fc/ninja-1.13.2-py3-none-any.whl
2026-11-28 01:07:40,988 INFO  [req13] GET /root/p2/+simple/ninja/
2026-11-28 01:07:41,000 INFO  [req14] GET /root/p2/+f/65a/24341b5ac09fc/ninja-1.13.2-py3-none-any.whl
"""


def test_devpi_counts_a_file_read_from_remote_as_a_miss_and_later_requests_as_hits():
    sizes = {"root/p2/+f/65a/24341b5ac09fc/ninja-1.13.2-py3-none-any.whl": 1000}
    stats = cache_stats.devpi_stats(DEVPI_LOG, sizes)
    assert (stats.hits, stats.misses, stats.bytes_served, stats.bytes_fetched) == (1, 1, 2000, 1000)


def test_stats_output_is_split_per_server():
    text = ("=== gpufleet-cache-stats acng ===\n" + ACNG_LOG + "=== gpufleet-cache-stats devpi ===\n" + DEVPI_LOG
            + "=== gpufleet-cache-stats files ===\n1000 root/p2/+f/65a/24341b5ac09fc/ninja-1.13.2-py3-none-any.whl\n")
    apt_stats, pip_stats = cache_stats.parse_stats_output(text)
    assert (apt_stats.server, apt_stats.hits, pip_stats.server, pip_stats.bytes_saved) == (
        "apt-cacher-ng", 2, "devpi-server", 1000)


def test_lab_mirror_access_log_gives_client_path_status_and_served_bytes(tmp_path):
    from gpufleet_lab import mirrors

    (tmp_path / "packages").mkdir()
    (tmp_path / "packages" / "a.whl").write_bytes(b"x" * 10)
    log = ('Serving HTTP on 10.213.47.1 port 8047 ...\n'
           '10.213.47.14 - - [28/Nov/2026 01:07:40] "GET /packages/a.whl HTTP/1.1" 200 -\n'
           '10.213.47.15 - - [28/Nov/2026 01:07:41] "GET /packages/missing.whl HTTP/1.1" 404 -\n')
    requests = mirrors.access_log(log)
    assert requests == [("10.213.47.14", "/packages/a.whl", 200), ("10.213.47.15", "/packages/missing.whl", 404)]
    assert mirrors.served_bytes(tmp_path, requests) == 10


def test_a_wsl_cache_host_without_systemd_is_told_to_turn_it_on_in_wsl_conf():
    text = cache.no_systemd_problem("desk-07", wsl=True)
    assert text.startswith("desk-07 is in the inventory group `cache`, but systemd is not its PID 1")
    assert "apt-cacher-ng and devpi-server only as systemd services" in text
    assert "put `[boot]` and `systemd=true` in /etc/wsl.conf, run `wsl --shutdown` on Windows" in text
    assert text.endswith("or list another host under `cache`.")


def test_a_cache_host_without_systemd_outside_wsl_is_not_sent_to_wsl_conf():
    text = cache.no_systemd_problem("ws01", wsl=False)
    assert text.startswith("ws01 is in the inventory group `cache`, but systemd is not its PID 1")
    assert "wsl" not in text.lower()
    assert "Boot it with systemd as init, or list another host under `cache`." in text


def test_devpi_runs_as_a_systemd_service_that_restarts_on_failure_and_logs_for_cache_stats():
    command = cache.devpi_command("/opt/gpufleet/cache-venv", DEFAULTS, ["10.0.0.5", "127.0.0.1"])
    unit = cache.devpi_unit(command, "gpufleet-cache", cache_stats.DEVPI_LOG).splitlines()
    assert ("ExecStart=/opt/gpufleet/cache-venv/bin/devpi-server --serverdir /var/cache/gpufleet/pypi "
            "--listen 10.0.0.5:3141 --listen 127.0.0.1:3141") in unit
    assert {"User=gpufleet-cache", "Restart=on-failure", f"StandardOutput=append:{cache_stats.DEVPI_LOG}",
            "WantedBy=multi-user.target"} <= set(unit)


def test_a_service_older_than_its_settings_file_is_stale():
    state = facts.SystemdServiceState()
    assert state.process(["no", "current"]) == facts.ServiceState(reload=False, stale=False)
    assert state.process(["no", "stale"]) == facts.ServiceState(reload=False, stale=True)
    assert state.process(["yes", "inactive"]) == facts.ServiceState(reload=True, stale=False)
    command = state.command(unit="gpufleet-devpi.service", paths=["/etc/systemd/system/gpufleet-devpi.service"])
    assert "systemctl show -P NeedDaemonReload gpufleet-devpi.service;" in command
    assert '[ "$(stat -c %Y "$f")" -gt "$since" ]' in command
