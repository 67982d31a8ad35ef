"""kill -9 the server during a burst of predictions, restart it, and check that every
prediction answered 200 is in the audit database intact and still explainable.

    python -m benchmarks.kill_during_writes [--clients 8] [--kill-after 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import httpx

from benchmarks.common import (
    BENCH_KEY,
    FIXTURES,
    default_store,
    free_port,
    multipart,
    report,
    running_server,
)


async def burst(
    url: str, body: bytes, headers: dict, clients: int, pid: int, kill_after: float
) -> dict[str, tuple[float, float | None]]:
    answered: dict[str, tuple[float, float | None]] = {}
    stop = time.perf_counter() + kill_after

    async with httpx.AsyncClient(timeout=10) as client:

        async def worker() -> None:
            while True:
                try:
                    response = await client.post(f"{url}/predict", content=body, headers=headers)
                except httpx.HTTPError:
                    return
                if response.status_code == 200:
                    data = response.json()
                    ood = data.get("out_of_distribution")
                    answered[data["prediction_id"]] = (
                        data["probabilities"]["PNEUMONIA"],
                        None if ood is None else ood["score"],
                    )

        async def killer() -> None:
            await asyncio.sleep(max(0.0, stop - time.perf_counter()))
            os.kill(pid, signal.SIGKILL)

        await asyncio.gather(killer(), *(worker() for _ in range(clients)))
    return answered


def same_record(answer: tuple[float, float | None], row: tuple[float, float | None]) -> bool:
    """The stored probability is the answered one; so is the out-of-distribution score, which
    the answer rounds to 3 decimals."""
    (p_answer, ood_answer), (p_row, ood_row) = answer, row
    if abs(p_answer - p_row) > 1e-9:
        return False
    if ood_answer is None or ood_row is None:
        return ood_answer is None and ood_row is None
    return abs(ood_answer - ood_row) <= 5e-4 + 1e-9


def run(clients: int, kill_after: float, store: Path | None = None) -> dict:
    store = store or default_store()
    image = (FIXTURES / "originals" / "NORMAL2-IM-0744-0001.jpeg").read_bytes()
    body, headers = multipart(image)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        port = free_port()
        with running_server(store, data_dir, port) as server:
            answered = asyncio.run(
                burst(server["url"], body, headers, clients, server["pid"], kill_after)
            )
            server["process"].wait(timeout=10)
        db = sqlite3.connect(data_dir / "pneumoscan.sqlite3")
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        rows = {
            row[0]: row[1:]
            for row in db.execute("SELECT id, p_pneumonia, ood_score FROM predictions")
        }
        db.close()
        missing = [pid for pid in answered if pid not in rows]
        mismatched = [
            pid
            for pid, answer in answered.items()
            if pid in rows and not same_record(answer, rows[pid])
        ]
        explain_status = None
        with running_server(store, data_dir, port) as server:
            if answered:
                first = next(iter(answered))
                explain_status = httpx.get(
                    f"{server['url']}/explain/{first}?num_samples=200",
                    headers={"X-API-Key": BENCH_KEY},
                    timeout=60,
                ).status_code
    result = {
        "answered_200": len(answered),
        "rows_after_restart": len(rows),
        "missing": len(missing),
        "mismatched": len(mismatched),
        "integrity": integrity,
        "explain_after_restart": explain_status,
        "passed": bool(answered)
        and not missing
        and not mismatched
        and integrity == "ok"
        and explain_status == 200,
    }
    report("kill -9 during writes", [(k, v) for k, v in result.items()], result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--kill-after", type=float, default=3.0)
    args = parser.parse_args()
    sys.exit(0 if run(args.clients, args.kill_after)["passed"] else 1)
