"""A small HTTP service to run under ``interknit run`` in tests: it answers 200 with its name,
and can be told to start late, say READY=1 late, and record what the registry and DNS showed
when SIGTERM reached it (the drain promise is about that moment).

    python child.py NAME [--listen-after S] [--ready-after S] [--on-term FILE] [--ignore-term]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def notify(message: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), path)


def seen_at_term(out: str) -> None:
    """What the registry and DNS say of this instance now."""
    api = os.environ["INTERKNIT_API"]
    service, iid = os.environ["INTERKNIT_SERVICE"], os.environ["INTERKNIT_ID"]
    with urllib.request.urlopen(f"{api}/v1/services/{service}/instances/{iid}", timeout=5) as r:
        health = json.loads(r.read())["health"]
    record = {"health": health, "at": time.time()}
    dns_port = os.environ.get("CHILD_DNS_PORT")
    if dns_port:
        import dns.message
        import dns.query

        answer = dns.query.udp(
            dns.message.make_query(f"{service}.ik.internal.", "SRV"),
            "127.0.0.1",
            port=int(dns_port),
            timeout=2,
        )
        ports = [rr.port for rrset in answer.answer for rr in rrset if hasattr(rr, "port")]
        record["dns_ports"] = ports
    with open(out, "w") as f:
        json.dump(record, f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--listen-after", type=float, default=0.0)
    parser.add_argument("--ready-after", type=float, default=None)
    parser.add_argument("--on-term", default=None)
    parser.add_argument("--ignore-term", action="store_true")
    args = parser.parse_args()
    port = int(os.environ["PORT"])
    body = args.name.encode()

    class Handler(BaseHTTPRequestHandler):
        # Head and body in one segment: written apart, Nagle and a delayed ACK hold the body
        # back 40 ms, which a latency figure would then measure.
        wbufsize = -1

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    def on_term(signum: int, frame: object) -> None:
        if args.on_term:
            seen_at_term(args.on_term)
        os._exit(0)

    signal.signal(signal.SIGTERM, signal.SIG_IGN if args.ignore_term else on_term)
    signal.signal(signal.SIGHUP, lambda s, f: print("child got SIGHUP", flush=True))
    time.sleep(args.listen_after)
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"child {args.name} listening on {port} at {time.time():.3f}", flush=True)
    if args.ready_after is not None:
        time.sleep(args.ready_after)
        notify("STATUS=warmed up\nREADY=1")
        print(f"child {args.name} ready at {time.time():.3f}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
