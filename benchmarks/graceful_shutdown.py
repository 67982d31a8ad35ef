"""SIGTERM during a burst of predictions, as an orchestrator stops an instance in a rolling
update: every request the server had accepted gets its answer (no 5xx, no connection cut
mid-response), later connections are refused, and the process exits within uvicorn's grace
period with no traceback. Loopback only, bounded in time.

    python -m benchmarks.graceful_shutdown [--clients 8] [--after 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import httpx

from app.settings import Settings
from benchmarks.common import FIXTURES, default_store, multipart, report, running_server

GRACE_S = 10.0  # app/cli.py: timeout_graceful_shutdown


async def burst(url: str, process, clients: int, after: float) -> tuple[Counter[str], float]:
    body, headers = multipart(
        (FIXTURES / "originals" / "person495_bacteria_2094.jpeg").read_bytes()
    )
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()
    exit_s = float("nan")
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def worker() -> None:
            while not stop.is_set():
                try:
                    answer = await client.post(f"{url}/predict", content=body, headers=headers)
                    outcomes[str(answer.status_code)] += 1
                except httpx.ConnectError:  # after the listener closed: refused, never sent
                    outcomes["refused"] += 1
                    await asyncio.sleep(0.05)
                except httpx.HTTPError as exc:  # sent, and the answer was lost
                    outcomes[type(exc).__name__] += 1
                    await asyncio.sleep(0.05)

        async def terminate() -> None:
            nonlocal exit_s
            await asyncio.sleep(after)
            sent = time.perf_counter()
            process.send_signal(signal.SIGTERM)
            while process.poll() is None and time.perf_counter() - sent < GRACE_S + 5:
                await asyncio.sleep(0.02)
            exit_s = time.perf_counter() - sent
            await asyncio.sleep(0.3)  # a few refused connections after the exit
            stop.set()

        await asyncio.gather(terminate(), *(worker() for _ in range(clients)))
    return outcomes, exit_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--after", type=float, default=3.0)
    parser.add_argument(
        "--drain",
        type=float,
        default=Settings.model_fields["drain_seconds"].default,
        help="PNEUMOSCAN_DRAIN_SECONDS (default: the service's default; 0: the listener "
        "closes at once)",
    )
    args = parser.parse_args()
    with running_server(
        default_store(),
        Path(tempfile.mkdtemp(prefix="pneumoscan-sigterm-")),
        extra_env={"PNEUMOSCAN_DRAIN_SECONDS": str(args.drain)},
    ) as server:
        outcomes, exit_s = asyncio.run(
            burst(server["url"], server["process"], args.clients, args.after)
        )
        tracebacks = server["log"].read_text().count("Traceback")
        returncode = server["process"].returncode
    lost = {k: v for k, v in outcomes.items() if k not in ("200", "refused")}
    passed = outcomes["200"] > 0 and not lost and exit_s <= args.drain + GRACE_S and tracebacks == 0
    rows = [
        ("clients; SIGTERM after; drain", f"{args.clients}; {args.after} s; {args.drain} s"),
        ("answers", dict(outcomes)),
        ("accepted requests without their answer", sum(lost.values())),
        ("exit after SIGTERM (s); return code", f"{exit_s:.2f}; {returncode}"),
        ("tracebacks in the log", tracebacks),
        ("result", "PASSED" if passed else "FAILED"),
    ]
    report(
        "graceful shutdown",
        rows,
        {
            "answers": dict(outcomes),
            "exit_s": round(exit_s, 3),
            "drain_s": args.drain,
            "tracebacks": tracebacks,
            "passed": passed,
        },
    )
    raise SystemExit(0 if passed else 1)


if __name__ == "__main__":
    main()
