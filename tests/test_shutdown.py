"""SIGTERM on a real `pneumoscan serve`: a drain with /readyz 503 before the listener closes,
and no request sent on an idle keep-alive connection is reset at shutdown (the race behind
`python -m benchmarks.graceful_shutdown`'s lost answers)."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from benchmarks.common import BENCH_KEY, running_server
from tests.conftest import fixture_bytes

JPEG = fixture_bytes("chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg")


def request_bytes(host: str) -> bytes:
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {BENCH_KEY}\r\n"
        f"Content-Type: image/jpeg\r\nContent-Length: {len(JPEG)}\r\n\r\n"
    )
    return head.encode() + JPEG


def read_response(sock: socket.socket) -> bytes:
    """One whole response (its head and Content-Length body); b'' if the server closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return data


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return True
    return False


def test_a_request_on_an_idle_connection_at_shutdown_is_answered(
    tiny_store: Path, tmp_path: Path
) -> None:
    with running_server(tiny_store, tmp_path) as server:
        url = urlparse(server["url"])
        sock = socket.create_connection((url.hostname, url.port), timeout=10)
        sock.sendall(request_bytes(url.netloc))
        assert read_response(sock).startswith(b"HTTP/1.1 200")  # now idle, kept alive
        server["process"].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not refused(url.hostname, url.port) and time.monotonic() < deadline:
            time.sleep(0.01)
        # The listener is closed and the kept-alive connection idle: uvicorn alone closed it
        # here, and a request its client had just sent was reset.
        sock.sendall(request_bytes(url.netloc))
        answer = read_response(sock)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b"connection: close" in answer.lower()
        assert sock.recv(1) == b""  # then closed
        sock.close()
        assert server["process"].wait(timeout=15) is not None


def test_sigterm_drains_with_readyz_503_before_the_listener_closes(
    tiny_store: Path, tmp_path: Path
) -> None:
    with running_server(
        tiny_store, tmp_path, extra_env={"PNEUMOSCAN_DRAIN_SECONDS": "3"}
    ) as server:
        url = server["url"]
        assert httpx.get(f"{url}/readyz").status_code == 200
        signalled = time.monotonic()
        server["process"].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2
        while httpx.get(f"{url}/readyz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and ready.json()["reason"].startswith("draining")
        answer = httpx.post(
            f"{url}/predict",
            content=JPEG,
            headers={"X-API-Key": BENCH_KEY, "Content-Type": "image/jpeg"},
        )
        assert answer.status_code == 200  # still answering while the balancer moves away
        assert time.monotonic() - signalled < 3
        server["process"].wait(timeout=20)
        assert time.monotonic() - signalled >= 3  # the drain ran to its end
