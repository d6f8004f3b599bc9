"""One send() per response (serving/transport.py): what a client sees must not change.

Raw sockets against a real uvicorn on a real port, once with the gateway's coalescing protocol and
once with uvicorn's own: the same bytes for pipelined keep-alive requests, a 100-continue
handshake still answered before the body is sent, a malformed request still answered 400.
"""

from __future__ import annotations

import socket

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from http_server import serve_in_thread


def make_app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"bytes": len(body)}, headers={"X-Seen": str(len(body))})

    return app


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_responses(sock: socket.socket, count: int) -> list[bytes]:
    """`count` complete HTTP responses (Content-Length bodies), as the bytes received."""
    data, out = b"", []
    while len(out) < count:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(out)} response(s); got {data!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed mid-body"
            rest += chunk
        out.append(head + b"\r\n\r\n" + rest[:length])
        data = rest[length:]
    return out


def without_date(response: bytes) -> bytes:
    return b"\r\n".join(line for line in response.split(b"\r\n") if not line.lower().startswith(b"date:"))


def request(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\n"
        + extra
        + (b"Content-Length: %d\r\n\r\n" % len(body))
        + body
    )


@pytest.mark.parametrize("coalesce", [True, False])
def test_pipelined_keep_alive_requests_get_every_response_in_order(coalesce):
    with serve_in_thread(make_app(), coalesce=coalesce) as url, connect(url) as sock:
        sock.sendall(b"".join(request(b"x" * n) for n in (1, 100, 70_000)))  # the last one spans segments
        got = read_responses(sock, 3)
    assert [r.split(b"\r\n\r\n", 1)[1] for r in got] == [b'{"bytes":1}', b'{"bytes":100}', b'{"bytes":70000}']
    assert all(r.startswith(b"HTTP/1.1 200 OK\r\n") for r in got)


def test_the_coalescing_protocol_sends_the_same_bytes_as_uvicorns_own():
    answers = {}
    for coalesce in (True, False):
        with serve_in_thread(make_app(), coalesce=coalesce) as url, connect(url) as sock:
            sock.sendall(request(b"abc"))
            answers[coalesce] = without_date(read_responses(sock, 1)[0])
    assert answers[True] == answers[False] and b"x-seen: 3" in answers[True]


def test_expect_100_continue_is_answered_before_the_client_sends_its_body():
    with serve_in_thread(make_app()) as url, connect(url) as sock:
        body = b"y" * 10
        sock.sendall(request(body, b"Expect: 100-continue\r\n")[: -len(body)])  # headers only
        interim = sock.recv(65536)  # a held write must still leave at the end of the loop step
        assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
        sock.sendall(body)
        [final] = read_responses(sock, 1)
    assert final.endswith(b'{"bytes":10}')


def test_a_malformed_request_still_gets_its_400_and_the_server_keeps_serving():
    with serve_in_thread(make_app()) as url:
        with connect(url) as sock:
            sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 400"), answer
        with connect(url) as sock:
            sock.sendall(request(b"ok"))
            assert read_responses(sock, 1)[0].endswith(b'{"bytes":2}')
