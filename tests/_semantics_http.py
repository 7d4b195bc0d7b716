"""
Small blocking HTTP/1.1 tools for tests/test_semantics.py.

They talk to the hub over plain sockets so that a test sees (and sends) the
exact bytes: status line and reason phrase, repeated headers in order, how the
body is framed.  Everything here blocks: run it in a thread
(``twisted.internet.threads.deferToThread``), never on the reactor thread.
Every socket has a timeout, so a hung hub fails the test instead of hanging it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Sequence

TIMEOUT = 20.0


class Reader:
    """Buffered reads from a blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.eof = False

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(262144)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def read_until(self, delimiter: bytes) -> bytes:
        """Up to and including ``delimiter``; raises EOFError if the peer closes first."""
        while True:
            index = self.buffer.find(delimiter)
            if index >= 0:
                end = index + len(delimiter)
                data, self.buffer = self.buffer[:end], self.buffer[end:]
                return data
            if not self._fill():
                raise EOFError(f"connection closed before {delimiter!r}; got {self.buffer[:200]!r}")

    def read_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not self._fill():
                raise EOFError(f"connection closed after {len(self.buffer)} of {n} bytes")
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def read_some(self, limit: int) -> bytes:
        """At least one byte (unless EOF), at most ``limit``."""
        if not self.buffer:
            self._fill()
        data, self.buffer = self.buffer[:limit], self.buffer[limit:]
        return data

    def read_to_close(self) -> bytes:
        while self._fill():
            pass
        data, self.buffer = self.buffer, b""
        return data


@dataclass
class Response:
    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    #: Interim (1xx) responses that came before this one, as raw heads.
    interim: list[bytes] = field(default_factory=list)

    def values(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (case-insensitive), in order."""
        lowered = name.lower()
        return [v for n, v in self.headers if n.lower() == lowered]

    def value(self, name: bytes) -> bytes | None:
        values = self.values(name)
        assert len(values) <= 1, f"header {name!r} sent {len(values)} times: {values!r}"
        return values[0] if values else None


def parse_head(head: bytes) -> tuple[bytes, int, bytes, list[tuple[bytes, bytes]]]:
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        headers.append((name, value.strip(b" \t")))
    return version, int(code), reason, headers


def read_response(reader: Reader, *, head_request: bool = False) -> Response:
    """One response (after any 1xx interim responses), body de-framed."""
    interim = []
    while True:
        head = reader.read_until(b"\r\n\r\n")
        version, status, reason, headers = parse_head(head)
        if 100 <= status < 200:
            interim.append(head)
            continue
        break
    response = Response(version, status, reason, headers, interim=interim)
    if head_request or status in (204, 304):
        return response
    encodings = [v.lower() for v in response.values(b"transfer-encoding")]
    if encodings:
        assert encodings == [b"chunked"], encodings
        response.body = read_chunked(reader)
    elif response.values(b"content-length"):
        response.body = reader.read_exact(int(response.value(b"content-length") or b"0"))
    else:
        response.body = reader.read_to_close()
    return response


def read_chunked(reader: Reader) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = reader.read_until(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            # trailer section, ended by an empty line
            while reader.read_until(b"\r\n") != b"\r\n":
                pass
            return b"".join(parts)
        parts.append(reader.read_exact(size))
        assert reader.read_exact(2) == b"\r\n"


def connect(port: int, *, rcvbuf: int | None = None, timeout: float = TIMEOUT) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        # Set before connect so the advertised window stays small.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    return sock


def build_request(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str | bytes]] | None = None,
    body: bytes | None = None,
    *,
    host: str | None = "pothead.test",
    close: bool = True,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode("latin-1")]
    if host is not None:
        lines.append(b"Host: " + host.encode("latin-1"))
    for name, value in headers or []:
        lines.append(name.encode("latin-1") + b": " + (value if isinstance(value, bytes) else value.encode("latin-1")))
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def send_all_tolerant(sock: socket.socket, data: bytes) -> bool:
    """Send ``data``; False if the peer stopped listening (a refused request)."""
    try:
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def exchange(port: int, data: bytes | list[bytes], *, head_request: bool = False) -> Response:
    """Send raw request bytes (possibly in several writes), read one response, close."""
    parts = [data] if isinstance(data, bytes) else data
    with connect(port) as sock:
        for part in parts:
            if not send_all_tolerant(sock, part):
                break
        return read_response(Reader(sock), head_request=head_request)


def request(port: int, method: str, target: str, headers: Sequence[tuple[str, str | bytes]] | None = None,
            body: bytes | None = None) -> Response:
    return exchange(port, build_request(method, target, headers, body), head_request=method == "HEAD")


def chunked(pieces: list[bytes], extension: bytes = b"") -> bytes:
    """``pieces`` as a chunked body (the last-chunk included)."""
    out = []
    for piece in pieces:
        out.append(b"%x%s\r\n%s\r\n" % (len(piece), extension, piece))
    out.append(b"0\r\n\r\n")
    return b"".join(out)
