"""Tiny real HTTP backends in threads, whose behaviour a test can switch while they run."""

from __future__ import annotations

import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Backend:
    """Answers ``status`` with its name as the body; ``hang`` makes it stall; ``delay`` slows
    every answer (and ``/slow`` paths by 100 ms). ``body`` replaces the name as the answer;
    ``host`` is the address it listens on; with ``tls`` it speaks https."""

    def __init__(
        self,
        name: str,
        host: str = "127.0.0.1",
        body: bytes | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.name = name
        self.status = 200
        self.hang = False
        self.hits = 0
        outer = self
        payload = body

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The head and the body go out in two writes: without TCP_NODELAY the body waits
            # for the peer's delayed ACK (about 40 ms an answer).
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                outer.hits += 1
                if outer.hang:
                    time.sleep(3)
                if "slow" in self.path:
                    time.sleep(0.1)
                body = outer.name.encode() if payload is None else payload
                self.send_response(outer.status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Backend", outer.name)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        if tls is not None:
            # The handshake happens in the request's thread, at its first read.
            self.server.socket = tls.wrap_socket(
                self.server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
