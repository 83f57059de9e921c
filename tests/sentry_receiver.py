"""A Sentry ingest endpoint on 127.0.0.1 for tests: accepts the SDK's envelopes (POST /api/<project>/envelope/,
gzip/deflate/brotli by Content-Encoding), keeps the raw (decompressed) bodies, the request headers and the events.
The DSN to give the real sentry-sdk is `receiver.dsn`."""

from __future__ import annotations

import gzip
import json
import re
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ENVELOPE_PATH = re.compile(r"^/api/(\d+)/envelope/$")


def decompress(body: bytes, encoding: str | None) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "br":
        import brotli  # the SDK compresses with brotli only when it is installed

        return brotli.decompress(body)
    return body


def envelope_items(body: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """(item header, payload) pairs of an envelope: a header line, then per item a header line and its payload
    (`length` bytes when given, else up to the next newline)."""
    _, _, rest = body.partition(b"\n")
    items = []
    while rest.strip():
        header_line, _, rest = rest.partition(b"\n")
        header = json.loads(header_line)
        if "length" in header:
            payload, rest = rest[: header["length"]], rest[header["length"] :].removeprefix(b"\n")
        else:
            payload, _, rest = rest.partition(b"\n")
        items.append((header, payload))
    return items


class SentryReceiver:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if not ENVELOPE_PATH.match(self.path):
                    self.send_error(404)
                    return
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = decompress(raw, self.headers.get("Content-Encoding"))
                receiver.receive(body, {name.lower(): value for name, value in self.headers.items()})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        port = self.server.server_address[1]
        self.dsn = f"http://publickey@127.0.0.1:{port}/1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def receive(self, body: bytes, headers: dict[str, str]) -> None:
        events = [json.loads(payload) for header, payload in envelope_items(body) if header.get("type") == "event"]
        with self.lock:
            self.bodies.append(body)
            self.headers.append(headers)
            self.events.extend(events)

    def __enter__(self) -> SentryReceiver:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def exception_of(event: dict[str, Any]) -> dict[str, Any]:
    """The outermost exception of an event (type, value, stacktrace)."""
    return event["exception"]["values"][-1]
