"""Slow and aborted uploads against a real uvicorn: a 408 for the slow one, and the service
keeps answering after both."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from benchmarks.common import BENCH_KEY, multipart, running_server
from tests.conftest import fixture_bytes


def raw_request(url: str, head_only_bytes: int, total: int, wait_s: float) -> bytes:
    parsed = urlparse(url)
    sock = socket.create_connection((parsed.hostname, parsed.port), timeout=10)
    body, headers = multipart(fixture_bytes("chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg"))
    head = (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {headers['Content-Type']}\r\n"
        f"X-API-Key: {BENCH_KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[:head_only_bytes])
    time.sleep(wait_s)
    try:
        return sock.recv(4096) if total else b""
    finally:
        sock.close()


def test_slow_and_aborted_uploads(tiny_store: Path, tmp_path: Path) -> None:
    env = {"PNEUMOSCAN_UPLOAD_TIMEOUT_S": "1"}
    with running_server(tiny_store, tmp_path / "data", extra_env=env) as server:
        url = server["url"]
        answer = raw_request(url, 100, 1, 1.5)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"upload_timeout" in answer
        raw_request(url, 100, 0, 0.1)  # abort mid-upload
        body, headers = multipart(fixture_bytes("chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg"))
        assert httpx.post(f"{url}/predict", content=body, headers=headers).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'status="500"' not in metrics


def test_idle_keep_alive_connection_outlives_client_pool_expiry(
    tiny_store: Path, tmp_path: Path
) -> None:
    """A pooled connection idle for longer than httpx's 5 s expiry is still open: the server
    must not be the side that closes first (a POST on a just-closed connection fails)."""
    import http.client

    with running_server(tiny_store, tmp_path / "data") as server:
        parsed = urlparse(server["url"])
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
        try:
            connection.request("GET", "/healthz")
            first = connection.getresponse()
            first.read()
            assert first.status == 200
            sock = connection.sock
            time.sleep(6)
            connection.request("GET", "/healthz")
            second = connection.getresponse()
            second.read()
            assert second.status == 200
            assert connection.sock is sock  # the same TCP connection, not a reconnect
        finally:
            connection.close()
