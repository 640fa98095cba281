"""The lab's mirror tree over https: https_server.py DIRECTORY ADDRESS PORT CERT KEY

Python's http.server (the same handler and access log lines as the plain-http mirror, mirrors.access_log reads
both) with TLS; run by mirrors.start_https_server as its own process, standard library only.
"""

import functools
import ssl
import sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class TlsServer(ThreadingHTTPServer):
    context: ssl.SSLContext

    def finish_request(self, request, client_address):  # type: ignore[no-untyped-def]
        # The handshake in the request's own thread: a client that never completes one holds up no other.
        with self.context.wrap_socket(request, server_side=True) as tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request, client_address):  # type: ignore[no-untyped-def]
        # One line, not a traceback: a client refusing the certificate is an expected event in the lab's tests.
        print(f"{client_address[0]} - - TLS or connection error: {sys.exc_info()[1]}", file=sys.stderr, flush=True)


def main(directory: str, address: str, port: str, cert: str, key: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=directory)
    with TlsServer((address, int(port)), handler) as server:
        server.context = context
        server.serve_forever()


if __name__ == "__main__":
    main(*sys.argv[1:])
