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


def test_a_key_at_its_in_flight_limit_gets_429_and_other_keys_are_still_served(
    tiny_store: Path, tmp_path: Path
) -> None:
    """PNEUMOSCAN_MAX_INFLIGHT_PER_KEY=2: a site with two uploads in flight gets 429 with
    Retry-After for a third, before its body is read, while another site's key is answered;
    once one of the first two finishes, the first site is served again."""
    other_key = "other-site-key-0123456789"
    env = {
        "PNEUMOSCAN_MAX_INFLIGHT_PER_KEY": "2",
        "PNEUMOSCAN_API_KEYS": f"{BENCH_KEY},{other_key}",
    }
    body, headers = multipart(fixture_bytes("chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg"))
    with running_server(tiny_store, tmp_path / "data", extra_env=env) as server:
        url = server["url"]
        parsed = urlparse(url)
        head = (
            f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {headers['Content-Type']}\r\n"
            f"X-API-Key: {BENCH_KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        held = []
        for _ in range(2):  # two uploads in flight: the head and part of the body sent
            sock = socket.create_connection((parsed.hostname, parsed.port), timeout=10)
            sock.sendall(head + body[:100])
            held.append(sock)
        deadline = time.monotonic() + 20
        while True:  # until both held uploads have reached the route (a loaded CI machine)
            third = httpx.post(f"{url}/predict", content=body, headers=headers)
            if third.status_code != 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert third.status_code == 429, third.text
        assert third.json()["error"]["code"] == "too_many_requests"
        assert third.headers["retry-after"] == "1"
        other = httpx.post(
            f"{url}/predict", content=body, headers={**headers, "X-API-Key": other_key}
        )
        assert other.status_code == 200
        held[0].sendall(body[100:])  # the first upload completes and is answered
        assert held[0].recv(4096).startswith(b"HTTP/1.1 200")
        assert httpx.post(f"{url}/predict", content=body, headers=headers).status_code == 200
        held[1].sendall(body[100:])
        assert held[1].recv(4096).startswith(b"HTTP/1.1 200")
        for sock in held:
            sock.close()
        metrics = httpx.get(f"{url}/metrics").text
        assert 'pneumoscan_rejected_total{reason="key_inflight_limit"} 1.0' in metrics


def test_a_request_head_must_arrive_in_time(tiny_store: Path, tmp_path: Path) -> None:
    """uvicorn never timed out a connection that had not sent a whole request head: a silent
    one and one trickling its headers were both still open after 90 s, each holding a file
    descriptor for good. With PNEUMOSCAN_HEAD_TIMEOUT_S the silent one is closed and the
    trickling one gets 408; a slow but complete head, and a kept-alive connection idle for
    longer than the head timeout between two requests, are served."""
    import http.client
    import json

    env = {"PNEUMOSCAN_HEAD_TIMEOUT_S": "1"}
    with running_server(tiny_store, tmp_path / "data", extra_env=env) as server:
        parsed = urlparse(server["url"])
        address = (parsed.hostname, parsed.port)
        silent = socket.create_connection(address, timeout=10)
        trickling = socket.create_connection(address, timeout=10)
        began = time.perf_counter()
        trickling.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nX-API-Key: ")
        assert silent.recv(100) == b""  # closed, unanswered
        answer = trickling.recv(4096)
        assert time.perf_counter() - began < 5
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"connection: close" in answer.lower()
        error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "request_head_timeout"
        assert trickling.recv(100) == b""
        for sock in (silent, trickling):
            sock.close()
        # a head sent in pieces within the time, then the same connection idle past it
        slow = socket.create_connection(address, timeout=10)
        slow.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.4)
        slow.sendall(b"Host: x\r\n\r\n")
        assert slow.recv(4096).startswith(b"HTTP/1.1 200")
        slow.close()
        connection = http.client.HTTPConnection(*address, timeout=10)
        try:
            sockets = []
            for _ in range(2):
                connection.request("GET", "/healthz")
                response = connection.getresponse()
                response.read()
                assert response.status == 200
                sockets.append(connection.sock)
                time.sleep(1.5)  # idle longer than the head timeout: uvicorn's keep-alive rules
            assert sockets[0] is sockets[1]  # the same TCP connection, not a reconnect
        finally:
            connection.close()
        log = server["log"].read_text()
    assert "Traceback" not in log, log[-2000:]
