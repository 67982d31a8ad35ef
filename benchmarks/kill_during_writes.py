"""kill -9 the server during a burst of predictions, restart it, and check that every
prediction answered 200 is in the audit database intact and still explainable. Each request
carries an Idempotency-Key; after the restart the clients retry the requests the kill left
unanswered, as a gateway does, and each image must then be in the audit trail exactly once:
a request recorded before the kill gets its prediction replayed, the others are scored.

    python -m benchmarks.kill_during_writes [--clients 8] [--kill-after 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
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

KEY_HEADER = "Idempotency-Key"


async def burst(
    url: str, body: bytes, headers: dict, clients: int, pid: int, kill_after: float
) -> tuple[dict[str, tuple[float, float | None]], list[str]]:
    """The predictions answered 200 (id: probability, out-of-distribution score) and the
    Idempotency-Keys of the requests the kill left without an answer."""
    answered: dict[str, tuple[float, float | None]] = {}
    unanswered: list[str] = []
    stop = time.perf_counter() + kill_after

    async with httpx.AsyncClient(timeout=10) as client:

        async def worker(number: int) -> None:
            for sent in itertools.count():
                key = f"kill-{number}-{sent}"
                try:
                    response = await client.post(
                        f"{url}/predict", content=body, headers={**headers, KEY_HEADER: key}
                    )
                except httpx.HTTPError:
                    unanswered.append(key)
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

        await asyncio.gather(killer(), *(worker(number) for number in range(clients)))
    return answered, unanswered


def retry(url: str, body: bytes, headers: dict, keys: list[str]) -> tuple[int, int]:
    """Send the unanswered requests again with their keys: (replayed, scored now)."""
    replayed = scored = 0
    for key in keys:
        response = httpx.post(
            f"{url}/predict", content=body, headers={**headers, KEY_HEADER: key}, timeout=60
        )
        response.raise_for_status()
        if response.headers.get("idempotent-replayed") == "true":
            replayed += 1
        else:
            scored += 1
    return replayed, scored


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
            answered, unanswered = asyncio.run(
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
            replayed, scored = retry(server["url"], body, headers, unanswered)
        db = sqlite3.connect(data_dir / "pneumoscan.sqlite3")
        rows_after_retries = db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
        db.close()
    # Every request that reached 200, before the kill or on its retry, is one image: the
    # audit trail must hold exactly one row for each, none twice.
    images = len(answered) + len(unanswered)
    result = {
        "answered_200": len(answered),
        "rows_after_restart": len(rows),
        "missing": len(missing),
        "mismatched": len(mismatched),
        "integrity": integrity,
        "explain_after_restart": explain_status,
        "unanswered_at_kill": len(unanswered),
        "retries_replayed": replayed,
        "retries_scored": scored,
        "rows_after_retries": rows_after_retries,
        "recorded_twice": rows_after_retries - images,
        "passed": bool(answered)
        and not missing
        and not mismatched
        and integrity == "ok"
        and explain_status == 200
        and replayed == len(rows) - len(answered)
        and rows_after_retries == images,
    }
    report("kill -9 during writes", [(k, v) for k, v in result.items()], result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--kill-after", type=float, default=3.0)
    args = parser.parse_args()
    sys.exit(0 if run(args.clients, args.kill_after)["passed"] else 1)
