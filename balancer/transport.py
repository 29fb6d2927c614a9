"""The proxy's HTTP/1.1 transport to nodes: keep-alive connections, one idle stack per node, and exchanges that tell
a failure before the request left (safe to send elsewhere) from one after it (never retried).

Progress polls are most of a balancer's traffic; a general-purpose client (requests, urllib3) spends several times
the CPU of the exchange itself per call, so forwarded calls use this small one. Health checks and the node job API
stay on `requests` (balancer.node_client).
"""

from __future__ import annotations

import functools
import socket
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit

MAX_HEADER_LINES = 200
MAX_LINE_BYTES = 65536


class ConnectFailed(Exception):
    """The connection could not be made: the request never left this process."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ExchangeFailed(Exception):
    """The connection broke or timed out after the request was (perhaps) sent. `before_answer` is True when not one
    byte of the answer came back (on a reused idle connection: the node had closed it)."""

    def __init__(self, reason: str, *, before_answer: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.before_answer = before_answer


@dataclass(frozen=True, kw_only=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class Connection:
    """One socket to a node with its buffered reader."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader: BinaryIO = sock.makefile("rb")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@dataclass(frozen=True, kw_only=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    @functools.lru_cache(maxsize=256)
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme or "http"
        return cls(scheme=scheme, host=parts.hostname or "", port=parts.port or (443 if scheme == "https" else 80))

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


class NodeConnections:
    """Idle keep-alive connections per node, shared by the process's threads."""

    def __init__(self, *, max_idle_per_node: int = 64, connect_timeout: float = 2.0) -> None:
        self.max_idle = max_idle_per_node
        self.connect_timeout = connect_timeout
        self.idle: dict[Origin, list[Connection]] = {}
        self.lock = threading.Lock()
        self.tls = ssl.create_default_context()

    def exchange(
        self,
        url: str,
        method: str,
        target: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: float,
        reuse: bool,
    ) -> Answer:
        """Send one request and read its answer.

        1. Take an idle connection (when `reuse`) or open one: failing to open is ConnectFailed.
        2. Send and read with `timeout` per socket operation: any failure is ExchangeFailed.
        3. Give the connection back when the answer leaves it reusable.
        """
        origin = Origin.of(url)
        connection = self._take(origin) if reuse else None
        reused = connection is not None
        if connection is None:
            connection = self._open(origin)
        try:
            connection.sock.settimeout(timeout)
            connection.sock.sendall(_request_bytes(method, target, origin.host_header, headers, body))
            answer, keep = _read_answer(connection.reader, method)
        except ExchangeFailed:
            connection.close()
            raise
        except TimeoutError:
            connection.close()
            raise ExchangeFailed("read timeout", before_answer=False) from None
        except OSError as error:
            connection.close()
            raise ExchangeFailed(f"connection lost ({type(error).__name__})", before_answer=reused) from error
        if keep and reuse:
            self._give_back(origin, connection)
        else:
            connection.close()
        return answer

    def _take(self, origin: Origin) -> Connection | None:
        with self.lock:
            stack = self.idle.get(origin)
            return stack.pop() if stack else None

    def _give_back(self, origin: Origin, connection: Connection) -> None:
        with self.lock:
            stack = self.idle.setdefault(origin, [])
            if len(stack) < self.max_idle:
                stack.append(connection)
                return
        connection.close()

    def _open(self, origin: Origin) -> Connection:
        try:
            sock = socket.create_connection((origin.host, origin.port), timeout=self.connect_timeout)
        except socket.gaierror:
            raise ConnectFailed("name resolution failed") from None
        except ConnectionRefusedError:
            raise ConnectFailed("connection refused") from None
        except TimeoutError:
            raise ConnectFailed("connect timeout") from None
        except OSError as error:
            raise ConnectFailed(f"connect failed ({error.strerror or type(error).__name__})") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if origin.scheme == "https":
            try:
                sock = self.tls.wrap_socket(sock, server_hostname=origin.host)
            except (OSError, ssl.SSLError) as error:
                sock.close()
                raise ConnectFailed(f"TLS handshake failed ({error})") from None
        return Connection(sock)


def _request_bytes(method: str, target: str, host: str, headers: Mapping[str, str], body: bytes | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items() if "\n" not in value and "\r" not in value)
    if body is not None or method.upper() in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="replace")
    return head + body if body else head


def _read_answer(reader: BinaryIO, method: str) -> tuple[Answer, bool]:
    """Status line, headers, and the body by Content-Length, chunks, or until the node closes; and whether the
    connection may carry another request."""
    status_line = reader.readline(MAX_LINE_BYTES)
    if not status_line:
        raise ExchangeFailed("connection closed before an answer", before_answer=True)
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ExchangeFailed(f"not an HTTP answer: {status_line[:60]!r}", before_answer=False)
    version, status = parts[0], int(parts[1])
    headers: list[tuple[str, str]] = []
    for _ in range(MAX_HEADER_LINES):
        line = reader.readline(MAX_LINE_BYTES)
        if line in (b"\r\n", b"\n"):
            break
        if not line:
            raise ExchangeFailed("connection closed in the headers", before_answer=False)
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    else:
        raise ExchangeFailed("too many header lines", before_answer=False)
    fields = {name.lower(): value for name, value in headers}
    keep = version == b"HTTP/1.1" and "close" not in fields.get("connection", "").lower()
    if method.upper() == "HEAD" or status in (204, 304) or 100 <= status < 200:
        body = b""
    elif "chunked" in fields.get("transfer-encoding", "").lower():
        body = _read_chunks(reader)
    elif "content-length" in fields:
        length = int(fields["content-length"])
        body = reader.read(length)
        if len(body) != length:
            raise ExchangeFailed("connection closed in the body", before_answer=False)
    else:
        body, keep = reader.read(), False
    return Answer(status=status, headers=tuple(headers), body=body), keep


def _read_chunks(reader: BinaryIO) -> bytes:
    chunks: list[bytes] = []
    while True:
        size_line = reader.readline(MAX_LINE_BYTES)
        if not size_line:
            raise ExchangeFailed("connection closed in a chunk", before_answer=False)
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while reader.readline(MAX_LINE_BYTES) not in (b"\r\n", b"\n", b""):
                pass  # trailers: nothing a proxied A1111 answer needs
            return b"".join(chunks)
        chunk = reader.read(size)
        if len(chunk) != size:
            raise ExchangeFailed("connection closed in a chunk", before_answer=False)
        chunks.append(chunk)
        reader.readline(MAX_LINE_BYTES)
