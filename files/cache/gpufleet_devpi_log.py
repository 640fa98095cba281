"""A logging filter for devpi-server on the fleet cache host: its request line names the client.

devpi-server logs "[reqN] GET /<path>" without the client's address; `gpufleet cache-stats` needs it for the
bytes per client. Loaded through devpi-server's --logger-cfg (gpufleet.cache.devpi_logging_config), this adds
" from <address>" to that one line, reading the address the connection came from (never a header a client
can set). Nothing else in the log changes.
"""

import logging


class ClientAddressFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            from pyramid.threadlocal import get_current_request
            request = get_current_request()
        except Exception:  # a log line outside a request, or pyramid not importable: leave it as it is
            return True
        if (request is not None and isinstance(record.msg, str) and record.msg.endswith("%s %s")
                and record.args == (request.method, request.path)):
            record.msg += " from %s"
            record.args = (*record.args, request.client_addr or "-")
        return True
