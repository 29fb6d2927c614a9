"""The proxy's HTTP transport (HttpNodeClient.forward) against scripted sockets: bodies by length, chunks and close,
a node closing an idle keep-alive connection, and which failures are safe to send elsewhere."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from balancer.node_client import HttpNodeClient, NodeUnreachable
from tests.processes import free_port

Script = Callable[[socket.socket, bytes], bool]
"""Answers one request on a connection; returns False to close the connection afterwards."""


class ScriptedNode:
    """A listening socket whose connections answer by `script` (a stand-in for a node; never a real one)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[bytes] = []
        self.connections = 0
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            reader = connection.makefile("rb")
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline()
                    if not line:
                        return
                    head += line
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
                request = head + reader.read(length)
                self.requests.append(request)
                if not self.script(connection, request):
                    return

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def scripted() -> Iterator[Callable[[Script], ScriptedNode]]:
    nodes: list[ScriptedNode] = []

    def start(script: Script) -> ScriptedNode:
        nodes.append(ScriptedNode(script))
        return nodes[-1]

    yield start
    for node in nodes:
        node.close()


def forward(url: str, method: str = "GET", body: bytes | None = None, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    return HttpNodeClient().forward(url, method, "/sdapi/v1/progress", headers={"X-User-Id": "alice"}, body=body,
                                    query="skip_current_image=true", timeout=timeout)  # fmt: skip


def test_it_reads_a_body_by_length_and_keeps_the_connection(scripted: Callable[[Script], ScriptedNode]) -> None:
    def answer(connection: socket.socket, request: bytes) -> bool:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        return True

    node = scripted(answer)
    client = HttpNodeClient()
    for _ in range(3):
        response = client.forward(node.url, "GET", "/sdapi/v1/progress", headers={}, body=None, query="", timeout=5)
        assert (response.status, response.body, response.header("content-type")) == (200, b"{}", "application/json")
    assert node.connections == 1
    assert node.requests[0].startswith(b"GET /sdapi/v1/progress HTTP/1.1\r\nHost: 127.0.0.1:")


def test_it_joins_chunks_and_drops_the_transfer_encoding(scripted: Callable[[Script], ScriptedNode]) -> None:
    def answer(connection: socket.socket, request: bytes) -> bool:
        connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Process-Time: 0.1\r\n\r\n"
                           b"3\r\n{\"a\r\n5;ext=1\r\n\": 1}\r\n0\r\n\r\n")  # fmt: skip
        return True

    response = forward(scripted(answer).url)
    assert response.body == b'{"a": 1}'
    assert response.header("transfer-encoding") is None
    assert response.header("x-process-time") == "0.1"


def test_it_reads_to_the_end_when_the_node_closes_after_its_answer(scripted: Callable[[Script], ScriptedNode]) -> None:
    def answer(connection: socket.socket, request: bytes) -> bool:
        connection.sendall(b"HTTP/1.0 200 OK\r\n\r\nnull")
        return False

    node = scripted(answer)
    assert forward(node.url).body == b"null"
    assert forward(node.url).body == b"null"
    assert node.connections == 2


def test_it_resends_an_idempotent_call_when_the_node_closed_the_idle_connection(
    scripted: Callable[[Script], ScriptedNode],
) -> None:
    def answer_once_then_close(connection: socket.socket, request: bytes) -> bool:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        return False  # like a node whose keep-alive timeout passed, without saying Connection: close

    node = scripted(answer_once_then_close)
    client = HttpNodeClient()
    for _ in range(3):
        assert client.forward(node.url, "GET", "/x", headers={}, body=None, query="", timeout=5).status == 200


def test_it_never_resends_a_generation_that_reached_the_node(scripted: Callable[[Script], ScriptedNode]) -> None:
    def die(connection: socket.socket, request: bytes) -> bool:
        return False

    node = scripted(die)
    with pytest.raises(NodeUnreachable) as failure:
        forward(node.url, "POST", b'{"prompt": "x"}')
    assert not failure.value.retry_safe
    assert len(node.requests) == 1
    assert node.requests[0].endswith(b'Content-Length: 15\r\n\r\n{"prompt": "x"}')


def test_it_says_a_refused_connection_is_safe_to_send_elsewhere() -> None:
    with pytest.raises(NodeUnreachable) as failure:
        forward(f"http://127.0.0.1:{free_port()}", "POST", b"{}")
    assert failure.value.retry_safe
    assert failure.value.reason == "connection refused"


def test_it_times_out_a_node_that_does_not_answer(scripted: Callable[[Script], ScriptedNode]) -> None:
    def hang(connection: socket.socket, request: bytes) -> bool:
        threading.Event().wait(5)
        return False

    with pytest.raises(NodeUnreachable) as failure:
        forward(scripted(hang).url, timeout=0.3)
    assert (failure.value.reason, failure.value.retry_safe) == ("read timeout", False)
