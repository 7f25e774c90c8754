"""agent.fetch: downloads through urllib, against a loopback server that answers exactly what
each test says (status, headers, body framing): every failure is an OSError that says what. The
worker's file policy allows each test exactly the loopback port it fetches from."""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from conftest import allowing

from agent.fetch import HTTPStatusError, open_url
from agent.policy import FilePolicy


class Canned:
    """A loopback server: each connection gets ``answer(request_head) -> bytes`` then is closed."""

    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.stopping = False
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def url(self, path: str = "/x") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.stopping:
                conn.close()
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(4096)
                    if not data:
                        break
                    head += data
                self.requests.append(head)
                conn.sendall(self.answer(head))

    def close(self) -> None:
        self.stopping = True
        socket.create_connection(("127.0.0.1", self.port), timeout=5).close()  # wakes accept()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def canned() -> Iterator[Callable[[Callable[[bytes], bytes]], Canned]]:
    servers: list[Canned] = []

    def start(answer: Callable[[bytes], bytes]) -> Canned:
        servers.append(Canned(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def fetch(url: str, allow: FilePolicy | None = None, **kwargs) -> bytes:
    """The body at ``url``, the policy allowing ``allow`` (default: the port of ``url`` on 127.0.0.1)."""
    if allow is None:
        port = url.split("127.0.0.1:", 1)[-1].split("/", 1)[0]
        allow = FilePolicy.from_dispatcher(allowing(addresses=[f"127.0.0.1:{port}"]))
    with open_url(url, allow, timeout=10, **kwargs) as body:
        parts = []
        while chunk := body.read(7):  # small reads: framing across read boundaries
            parts.append(chunk)
        return b"".join(parts)


def test_content_length_body(canned) -> None:
    server = canned(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world")
    assert fetch(server.url("/a/b?c=d")) == b"hello world"
    request = server.requests[0].decode()
    assert request.startswith("GET /a/b?c=d HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n" in request


def test_chunked_body_with_extensions_and_trailers(canned) -> None:
    body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    server = canned(lambda head: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert fetch(server.url()) == b"hello world"


def test_body_until_close_and_http_1_0(canned) -> None:
    server = canned(lambda head: b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\n" + b"x" * 100_000)
    assert fetch(server.url()) == b"x" * 100_000


def test_continue_then_answer(canned) -> None:
    server = canned(lambda head: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert fetch(server.url()) == b"ok"


def test_headers_of_the_job_replace_ours(canned) -> None:
    server = canned(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert fetch(server.url(), headers={"user-agent": "lab/1", "X-Token": "t0k"}) == b""
    request = server.requests[0].decode().lower()
    assert "user-agent: lab/1\r\n" in request and "x-token: t0k\r\n" in request
    assert "python-urllib" not in request


def test_user_and_password_in_the_url(canned) -> None:
    server = canned(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    fetch(server.url().replace("http://", "http://us%40r:p%3Ass@"))
    # base64 of "us@r:p:ss"
    assert "Authorization: Basic dXNAcjpwOnNz\r\n" in server.requests[0].decode()
    assert f"Host: 127.0.0.1:{server.port}\r\n" in server.requests[0].decode()


def test_redirects_are_followed(canned) -> None:
    target = canned(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")

    def answer(head: bytes) -> bytes:
        if head.startswith(b"GET /first "):
            return b"HTTP/1.1 302 Found\r\nLocation: /second\r\nContent-Length: 0\r\n\r\n"
        return f"HTTP/1.1 301 Moved\r\nLocation: {target.url('/final')}\r\n\r\n".encode()

    server = canned(answer)
    both = FilePolicy.from_dispatcher(allowing(addresses=[f"127.0.0.1:{server.port}", f"127.0.0.1:{target.port}"]))
    assert fetch(server.url("/first"), both) == b"done"
    assert [r.split(b"\r\n")[0] for r in server.requests] == [b"GET /first HTTP/1.1", b"GET /second HTTP/1.1"]
    assert target.requests[0].startswith(b"GET /final HTTP/1.1")


def test_endless_redirects_give_up(canned) -> None:
    server = canned(lambda head: b"HTTP/1.1 302 Found\r\nLocation: /again\r\n\r\n")
    with pytest.raises(HTTPStatusError, match="redirect"):
        fetch(server.url())
    assert 2 <= len(server.requests) <= 11


@pytest.mark.parametrize("status", [404, 500, 304])
def test_error_status(canned, status: int) -> None:
    server = canned(lambda head: f"HTTP/1.1 {status} Some Reason\r\nContent-Length: 4\r\n\r\nnope".encode())
    with pytest.raises(HTTPStatusError) as caught:
        fetch(server.url())
    assert (caught.value.code, caught.value.reason, str(caught.value)) == (
        status, "Some Reason", f"HTTP {status} Some Reason")


def test_truncated_body_is_an_error(canned) -> None:
    server = canned(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
    with pytest.raises(OSError, match="cut short"):
        fetch(server.url())


@pytest.mark.parametrize("answer", [b"SSH-2.0-OpenSSH\r\n", b""])
def test_not_http_is_an_error(canned, answer: bytes) -> None:
    server = canned(lambda head: answer)
    with pytest.raises(OSError):
        fetch(server.url())


def test_refused_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed when the block ends: nothing listens there
    with pytest.raises(ConnectionRefusedError):
        fetch(f"http://127.0.0.1:{port}/x")


def test_proxy_and_file_urls(canned, monkeypatch, tmp_path) -> None:
    # a proxy receives the absolute URL, as urllib sends it; the server named in it never answers
    proxy = canned(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nproxied")
    monkeypatch.setenv("http_proxy", proxy.url(""))
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urlopen's opener reads the proxies once and is kept: a fresh one here, and none kept after
    urllib.request.install_opener(None)
    try:
        proxied = FilePolicy.from_dispatcher(allowing(addresses=[f"127.0.0.1:{proxy.port}"]))
        assert fetch("http://image-server.invalid/kernel", proxied) == b"proxied"
        assert proxy.requests[0].startswith(b"GET http://image-server.invalid/kernel HTTP/1.1")
        monkeypatch.delenv("http_proxy")
        urllib.request.install_opener(None)
        (tmp_path / "definition.yaml").write_text("run: {}\n")
        definition = (tmp_path / "definition.yaml").as_uri()
        assert fetch(definition, FilePolicy.from_dispatcher(allowing([tmp_path]))) == b"run: {}\n"
    finally:
        urllib.request.install_opener(None)
