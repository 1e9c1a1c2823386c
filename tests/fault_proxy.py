"""A loopback HTTP/1.1 reverse proxy that injects S3-style faults, for testing retry settings.

    with FaultProxy("http://127.0.0.1:PORT", rate=0.3, seed=0) as proxy:
        fs = s3fs.S3FileSystem(endpoint_url=proxy.url, ...)

Each request is read whole, then (with probability `rate`, from a seeded RNG) answered with a
fault instead of, or on top of, being forwarded to `upstream` with http.client:
  "503"      503 ServiceUnavailable (S3 XML error), not forwarded
  "throttle" 503 SlowDown, not forwarded
  "500"      500 InternalError, not forwarded
  "reset"    TCP RST (SO_LINGER 0) without a response, not forwarded
  "slow"     sleep slow_s, then forwarded normally (the request takes effect even when the
             client has given up: a server that is slow, not one that is down)
  "truncate" (opt-in) forwarded; the status, headers and half the body are sent, then RST
             (RST alone when the answer has no body: the request took effect, its answer lost)
The error kinds are not forwarded, so a retried request never takes effect twice.
"""
import http.client
import random
import socket
import struct
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

DEFAULT_KINDS = ("503", "throttle", "500", "reset", "slow")
KINDS = DEFAULT_KINDS + ("truncate",)
# Kind -> (status, S3 error code, message) for the faults answered with an error document.
_ERRORS = {
    "503": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "throttle": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
}
# Per-connection headers (RFC 9110 7.6.1): they describe one hop, not the message. Expect is
# answered by this proxy (100 Continue) since it reads the whole body before forwarding.
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "trailers", "transfer-encoding", "upgrade", "expect", "content-length"}


def _rst(sock: socket.socket) -> None:
    """Close with an RST, not a FIN: SO_LINGER 0, and close the fd itself (detached) so that
    the server's later shutdown(SHUT_WR) cannot send a FIN first."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        socket.close(sock.detach())
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients pool connections
    timeout = 60  # idle keep-alive connections end eventually

    def log_message(self, *args):  # no per-request noise on stderr
        pass

    def setup(self):
        super().setup()
        with self.server.proxy._lock:
            self.server.conns.add(self.connection)

    def finish(self):
        with self.server.proxy._lock:
            self.server.conns.discard(self.connection)
        super().finish()

    def _read_body(self) -> bytes:
        # Chunked transfer coding is undone here: the upstream gets a Content-Length body.
        # aws-chunked (Content-Encoding) is part of the payload and passes through untouched.
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers: none of our clients send HTTP-level ones
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self):
        proxy: FaultProxy = self.server.proxy
        body = self._read_body()
        kind = proxy._draw(self.command, self.path, self.headers)
        if kind in _ERRORS:
            status, code, message = _ERRORS[kind]
            doc = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                   f"<Message>{message}</Message><RequestId>{uuid.uuid4().hex}</RequestId>"
                   "<HostId>fault-proxy</HostId></Error>").encode()
            doc = b"" if self.command == "HEAD" else doc
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(doc)))
            self.end_headers()
            self.wfile.write(doc)
            return
        if kind == "reset":
            self.close_connection = True
            _rst(self.connection)
            return
        if kind == "slow":
            time.sleep(proxy.slow_s)
        self._forward(body, truncate=kind == "truncate")

    def _forward(self, body: bytes, truncate: bool):
        proxy: FaultProxy = self.server.proxy
        conn = http.client.HTTPConnection(proxy._host, proxy._port, timeout=proxy.upstream_timeout)
        try:
            # Host is kept as the client sent it: it is part of the SigV4 signature.
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP:
                    conn.putheader(name, value)
            if body or self.command in ("PUT", "POST") or "Content-Length" in self.headers:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
            no_body = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
            length = resp.getheader("Content-Length")
            data = None
            if not no_body and (length is None or truncate):
                data = resp.read()  # chunked or close-delimited: framed again below
                length = str(len(data))
            if truncate and not data:  # nothing to cut short: the answer is lost whole
                self.close_connection = True
                _rst(self.connection)
                return
            self.send_response(resp.status, resp.reason)
            for k, v in headers:
                self.send_header(k, v)
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            if no_body:
                return
            if truncate:  # the request took effect, but the client gets half an answer
                self.wfile.write(data[: len(data) // 2])
                self.close_connection = True
                _rst(self.connection)
                return
            if data is not None:
                self.wfile.write(data)
                return
            while chunk := resp.read(1 << 16):
                self.wfile.write(chunk)
        finally:
            conn.close()

    def _run(self):
        try:
            self._handle()
        except OSError:
            # The client went away (e.g. it timed out on a slow response and retried).
            self.close_connection = True

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _run


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False

    def handle_error(self, request, client_address):  # disconnects are expected here
        pass


class FaultProxy:
    """Reverse proxy on 127.0.0.1 (a free port) in front of `upstream` (http://host:port).

    faults: {kind: count injected}; requests: total requests seen; url: the proxy's URL.
    `rate` may be changed while running (e.g. 0 during setup). `only`, if given, is
    predicate(method, path, headers) -> bool: requests it rejects are never faulted and
    draw no random number."""

    def __init__(self, upstream: str, rate: float, seed: int, kinds=DEFAULT_KINDS,
                 slow_s: float = 0.2, only=None, upstream_timeout: float = 60.0):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
        self.upstream = upstream
        self._host, self._port = parts.hostname, parts.port
        self.rate, self.kinds, self.slow_s, self.only = rate, tuple(kinds), slow_s, only
        self.upstream_timeout = upstream_timeout
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.faults = {k: 0 for k in self.kinds}
        self.requests = 0
        self.log: list = []  # (method, path, kind or None) per request, in arrival order
        self._server = None
        self._thread = None

    def _draw(self, method, path, headers):
        eligible = self.only is None or self.only(method, path, headers)
        with self._lock:  # one RNG, one order: the same request sequence gets the same faults
            self.requests += 1
            kind = None
            if eligible and self._rng.random() < self.rate:
                kind = self._rng.choice(self.kinds)
                self.faults[kind] += 1
            self.log.append((method, path, kind))
            return kind

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FaultProxy not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FaultProxy":
        if self._server is None:
            self._server = _Server(("127.0.0.1", 0), _Handler)  # loopback only, free port
            self._server.proxy = self
            self._server.conns = set()
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.05}, daemon=True,
                                            name="fault-proxy")
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with self._lock:  # end kept-alive connections too: nothing is served after stop()
                for sock in list(self._server.conns):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            self._thread.join(5)
            self._server = self._thread = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
