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
    assert command == ["/opt/v/bin/devpi-server", "--serverdir", "/srv/c/pypi", "--logger-cfg",
                       "/usr/local/lib/gpufleet/devpi-logging.json", "--listen", "10.0.0.5:3141",
                       "--listen", "127.0.0.1:3141"]


def test_devpi_verifies_https_upstreams_against_the_hosts_trust_store_not_certifis():
    # devpi-server's httpx client takes requests' certifi bundle unless REQUESTS_CA_BUNDLE names another: an
    # internal CA installed with update-ca-certificates would be refused. Never switched off, only redirected.
    command = cache.devpi_command("/opt/v", DEFAULTS, ["127.0.0.1"])
    environment = cache.devpi_environment()
    assert environment["REQUESTS_CA_BUNDLE"] == "/etc/ssl/certs/ca-certificates.crt"
    assert not any("verify" in part.lower() or "insecure" in part.lower() for part in command)
    unit = cache.devpi_unit(command, "gpufleet-cache", "/var/log/x.log", environment).splitlines()
    assert "Environment=REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt" in unit


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
           '10.213.47.15 - - [28/Nov/2026 01:07:41] "GET /packages/missing.whl HTTP/1.1" 404 -\n'
           '10.213.47.16 - - [28/Nov/2026 01:07:42] "GET /packages/t-1%2Bcu128.whl HTTP/1.1" 200 -\n')
    (tmp_path / "packages" / "t-1+cu128.whl").write_bytes(b"y" * 5)
    requests = mirrors.access_log(log)
    assert requests == [("10.213.47.14", "/packages/a.whl", 200), ("10.213.47.15", "/packages/missing.whl", 404),
                        ("10.213.47.16", "/packages/t-1+cu128.whl", 200)]
    assert mirrors.served_bytes(tmp_path, requests) == 15


def test_acng_counts_the_bytes_sent_to_each_client_address():
    stats = cache_stats.acng_stats(ACNG_LOG)
    assert stats.per_client == {"10.0.0.11": 4620, "10.0.0.12": 4620, "10.0.0.13": 4620}


# As devpi-server 6.20.3 logs with gpufleet's --logger-cfg filter (files/cache/gpufleet_devpi_log.py).
DEVPI_LOG_WITH_CLIENTS = """\
2026-12-03 07:10:02,101 INFO  [req3] GET /root/pypi/+f/65a/24341b5ac09fc/ninja-1.13.2-py3-none-any.whl from 10.0.0.11
2026-12-03 07:10:02,105 INFO  [req3] [Rtx4] reading remote: URL('http://10.0.0.1:8047/packages/ninja-1.13.2-py3-none-any.whl'), target root/pypi/+f/65a/24341b5ac09fc/ninja-1.13.2-py3-none-any.whl
2026-12-03 07:10:02,300 INFO  [req4] GET /root/pypi/+simple/torch/ from 10.0.0.12
2026-12-03 07:10:02,410 INFO  [req5] GET /root/pypi/+f/0d1/1f2e3d4c5b6a7/torch-2.12.0.dev20260407+cu128-py3-none-any.whl from 10.0.0.12
2026-12-03 07:10:03,000 INFO  [req6] GET /root/pypi/+f/65a/24341b5ac09fc/ninja-1.13.2-py3-none-any.whl from 10.0.0.12
"""
DEVPI_SIZES = {"root/pypi/+f/65a/24341b5ac09fc/ninja-1.13.2-py3-none-any.whl": 1000,
               "root/pypi/+f/0d1/1f2e3d4c5b6a7/torch-2.12.0.dev20260407+cu128-py3-none-any.whl": 300_000_000}


def test_devpi_counts_the_package_bytes_sent_to_each_client_address():
    stats = cache_stats.devpi_stats(DEVPI_LOG_WITH_CLIENTS, DEVPI_SIZES)
    assert stats.per_client == {"10.0.0.11": 1000, "10.0.0.12": 300_001_000}
    assert (stats.hits, stats.misses, stats.bytes_fetched) == (2, 1, 1000)


def test_devpi_log_without_client_addresses_still_counts_hits_and_misses():
    stats = cache_stats.devpi_stats(DEVPI_LOG, {"root/p2/+f/65a/24341b5ac09fc/ninja-1.13.2-py3-none-any.whl": 1000})
    assert (stats.hits, stats.misses, stats.per_client) == (1, 1, {})


def test_stats_output_gives_each_servers_disk_use_from_du():
    text = ("=== gpufleet-cache-stats acng ===\n" + ACNG_LOG + "=== gpufleet-cache-stats devpi ===\n"
            + DEVPI_LOG_WITH_CLIENTS + "=== gpufleet-cache-stats files ===\n"
            + "".join(f"{size} {path}\n" for path, size in DEVPI_SIZES.items())
            + "=== gpufleet-cache-stats disk ===\n612034567\t/var/cache/gpufleet/apt\n"
            + "301234567\t/var/cache/gpufleet/pypi\n")
    apt_stats, pip_stats = cache_stats.parse_stats_output(text)
    assert (apt_stats.disk_bytes, pip_stats.disk_bytes) == (612034567, 301234567)
    assert pip_stats.per_client["10.0.0.12"] == 300_001_000


def test_missing_du_output_shows_a_dash_not_zero():
    apt_stats, pip_stats = cache_stats.parse_stats_output("=== gpufleet-cache-stats acng ===\n" + ACNG_LOG)
    assert apt_stats.disk_bytes is None
    assert cache_stats.report_lines([apt_stats, pip_stats])[1].split()[-1] == "-"


def test_stats_command_measures_both_cache_dirs_with_du(tmp_path):
    command = cache_stats.stats_command("/srv/my cache")
    assert "du -sb -- '/srv/my cache/apt' '/srv/my cache/pypi'" in command


def test_report_fits_80_columns_and_lists_clients_in_address_order():
    stats = [cache_stats.acng_stats(ACNG_LOG + "1795828062|O|612000000|10.0.0.2|d/cuda-toolkit-12-8_12.8.1-1_amd64.deb\n"),
             cache_stats.devpi_stats(DEVPI_LOG_WITH_CLIENTS, DEVPI_SIZES)]
    stats[0].disk_bytes, stats[1].disk_bytes = 612_034_567, 301_234_567
    lines = cache_stats.report_lines(stats)
    assert max(len(line) for line in lines) <= 80, lines
    clients = [line.split()[0] for line in lines[lines.index("") + 2:]]
    assert clients == ["10.0.0.2", "10.0.0.11", "10.0.0.12", "10.0.0.13"]
    row = dict((line.split()[0], line.split()[1:]) for line in lines[lines.index("") + 2:])
    assert row["10.0.0.12"] == ["0.0", "300.0", "300.0"]
    assert lines[2].split()[-1] == "301.2"


def test_devpi_log_filter_appends_the_connections_address_to_the_request_line(monkeypatch):
    import importlib.util
    import logging
    import sys
    import types
    from pathlib import Path

    request = types.SimpleNamespace(method="GET", path="/root/pypi/+f/abc/x.whl", client_addr="10.0.0.12")
    threadlocal = types.ModuleType("pyramid.threadlocal")
    threadlocal.get_current_request = lambda: request
    monkeypatch.setitem(sys.modules, "pyramid", types.ModuleType("pyramid"))
    monkeypatch.setitem(sys.modules, "pyramid.threadlocal", threadlocal)
    path = Path(__file__).resolve().parents[2] / "files" / "cache" / "gpufleet_devpi_log.py"
    spec = importlib.util.spec_from_file_location("gpufleet_devpi_log", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def record(msg, *args):
        return logging.LogRecord("", logging.INFO, __file__, 1, msg, args, None)

    request_line = record("[req5] %s %s", "GET", "/root/pypi/+f/abc/x.whl")
    other = record("[req5] [Rtx4] reading remote: %s", "URL('x')")
    filt = module.ClientAddressFilter()
    assert filt.filter(request_line) and filt.filter(other)
    assert request_line.getMessage() == "[req5] GET /root/pypi/+f/abc/x.whl from 10.0.0.12"
    assert other.getMessage() == "[req5] [Rtx4] reading remote: URL('x')"
    assert cache_stats._DEVPI_SERVED.search(request_line.getMessage()).groups() == (
        "root/pypi/+f/abc/x.whl", "10.0.0.12")


def test_devpi_logging_config_keeps_devpis_format_and_adds_the_filter():
    import json

    config = json.loads(cache.devpi_logging_config())
    handler = config["handlers"]["stdout"]
    assert handler["filters"] == ["client"] and config["root"] == {"level": "INFO", "handlers": ["stdout"]}
    assert config["formatters"][handler["formatter"]]["format"] == "%(asctime)s %(levelname)-5.5s %(message)s"
    assert config["filters"]["client"]["()"] == "gpufleet_devpi_log.ClientAddressFilter"


def test_acng_names_an_ipv4_client_of_a_dual_stack_socket_by_its_ipv4_address():
    stats = cache_stats.acng_stats("1795828061|O|4620|::ffff:10.0.0.12|debian/./tree_2.1.0-1_amd64.deb\n")
    assert stats.per_client == {"10.0.0.12": 4620}


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
    unit = cache.devpi_unit(command, "gpufleet-cache", cache_stats.DEVPI_LOG, cache.devpi_environment()).splitlines()
    assert ("ExecStart=/opt/gpufleet/cache-venv/bin/devpi-server --serverdir /var/cache/gpufleet/pypi "
            "--logger-cfg /usr/local/lib/gpufleet/devpi-logging.json "
            "--listen 10.0.0.5:3141 --listen 127.0.0.1:3141") in unit
    assert "Environment=PYTHONPATH=/usr/local/lib/gpufleet/devpi-log" in unit
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
