"""Two service instances on one data dir (two containers on one volume, or two processes on one
host): started together on a fresh data dir, each answers for the other's predictions, and
the audit database stays whole under both. Real uvicorns on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import re
import sqlite3
from pathlib import Path

import httpx

from benchmarks.common import BENCH_KEY, running_server
from tests.conftest import fixture_bytes

JPEG = fixture_bytes("chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg")
KEY = {"X-API-Key": BENCH_KEY}


def test_two_instances_share_one_data_dir(tiny_store: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"  # not there yet: both create it and the database at once
    servers = [running_server(tiny_store, data) for _ in range(2)]
    with concurrent.futures.ThreadPoolExecutor(2) as starting:
        started = list(starting.map(lambda server: server.__enter__(), servers))
    try:
        urls = [srv["url"] for srv in started]

        def post(index: int) -> str:
            answer = httpx.post(
                f"{urls[index % 2]}/predict",
                content=JPEG,
                headers={**KEY, "Content-Type": "image/jpeg"},
                timeout=60,
            )
            assert answer.status_code == 200, answer.text
            return answer.json()["prediction_id"]

        with concurrent.futures.ThreadPoolExecutor(8) as clients:
            made = list(clients.map(post, range(200)))
        # each instance answers for a prediction the other made
        for index in (0, 1):
            other, prediction = urls[1 - index], made[index]
            found = httpx.get(f"{other}/predictions/{prediction}", headers=KEY, timeout=30)
            assert found.status_code == 200 and found.json()["prediction_id"] == prediction
            read = httpx.put(
                f"{other}/predictions/{prediction}/reading",
                json={"label": "NORMAL"},
                headers=KEY,
                timeout=30,
            )
            assert read.status_code == 200, read.text
        overlay = httpx.get(
            f"{urls[1]}/explain/{made[0]}", params={"num_samples": 100}, headers=KEY, timeout=120
        )
        assert overlay.status_code == 200 and overlay.content.startswith(b"\x89PNG")
        # the reads are the database's: either instance counts both, under the database's id,
        # so that alerting rules count them once (max by database)
        databases = set()
        for url in urls:
            metrics = httpx.get(f"{url}/metrics", timeout=30).text
            series = [
                line for line in metrics.splitlines() if line.startswith("pneumoscan_readings{")
            ]
            assert sum(float(line.rsplit(" ", 1)[1]) for line in series) == 2, url
            databases |= {re.search(r'database="(\w+)"', line)[1] for line in series}
        assert len(databases) == 1
        logs = [srv["log"].read_text() for srv in started]
    finally:
        for server in servers:
            server.__exit__(None, None, None)
    database = sqlite3.connect(data / "pneumoscan.sqlite3")
    assert database.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 200
    assert database.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    database.close()
    for log in logs:
        assert "Traceback" not in log and "database is locked" not in log, log[-2000:]
