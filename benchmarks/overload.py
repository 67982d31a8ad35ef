"""Overload: 64 concurrent clients for 60 s against a real uvicorn on loopback (bounded).

    python -m benchmarks.overload [--clients 64] [--seconds 60]

Pass: no 5xx except 503 with Retry-After, every 200 carries the right probabilities, /healthz
answers throughout, RSS stays bounded, and one-client latency afterwards is back to normal.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import httpx

from benchmarks.common import (
    FIXTURES,
    default_store,
    multipart,
    percentiles,
    report,
    rss_mb,
    running_server,
)


def single_latency(url: str, body: bytes, headers: dict, n: int = 40) -> float:
    with httpx.Client(timeout=30) as client:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            client.post(f"{url}/predict", content=body, headers=headers).raise_for_status()
            times.append((time.perf_counter() - t) * 1000)
    return percentiles(times, (50,))["p50"]


async def flood(
    url: str, body: bytes, headers: dict, expected: float, clients: int, seconds: float, pid: int
) -> dict:
    end = time.perf_counter() + seconds
    counts: dict[str, int] = {}
    wrong = 0
    health_failures = 0
    health_checks = 0
    rss_peak = 0.0

    def bump(key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    async with httpx.AsyncClient(
        timeout=60, limits=httpx.Limits(max_connections=clients + 4)
    ) as client:

        async def worker() -> None:
            nonlocal wrong
            while time.perf_counter() < end:
                try:
                    response = await client.post(f"{url}/predict", content=body, headers=headers)
                except httpx.HTTPError as exc:
                    bump(f"transport:{type(exc).__name__}")
                    continue
                code = response.status_code
                if code == 200:
                    if abs(response.json()["probabilities"]["PNEUMONIA"] - expected) > 1e-4:
                        wrong += 1
                    bump("200")
                elif code == 503 and "retry-after" in response.headers:
                    bump("503_retry_after")
                    await asyncio.sleep(float(response.headers["retry-after"]) / 10)
                else:
                    bump(str(code))

        async def prober() -> None:
            nonlocal health_failures, health_checks, rss_peak
            async with httpx.AsyncClient(timeout=2) as probe:
                while time.perf_counter() < end:
                    health_checks += 1
                    try:
                        if (await probe.get(f"{url}/healthz")).status_code != 200:
                            health_failures += 1
                    except httpx.HTTPError:
                        health_failures += 1
                    rss_peak = max(rss_peak, rss_mb(pid))
                    await asyncio.sleep(0.5)

        await asyncio.gather(prober(), *(worker() for _ in range(clients)))
    return {
        "counts": counts,
        "wrong_predictions": wrong,
        "healthz_checks": health_checks,
        "healthz_failures": health_failures,
        "rss_peak_mb": rss_peak,
    }


def run(clients: int, seconds: float) -> bool:
    image = (FIXTURES / "originals" / "person495_bacteria_2094.jpeg").read_bytes()
    body, headers = multipart(image)
    with (
        tempfile.TemporaryDirectory() as data_dir,
        running_server(default_store(), Path(data_dir)) as server,
    ):
        url = server["url"]
        with httpx.Client(timeout=30) as c:
            expected = c.post(f"{url}/predict", content=body, headers=headers).json()[
                "probabilities"
            ]["PNEUMONIA"]
        before = single_latency(url, body, headers)
        result = asyncio.run(flood(url, body, headers, expected, clients, seconds, server["pid"]))
        time.sleep(1)
        after = single_latency(url, body, headers)
        rss_after = rss_mb(server["pid"])
    bad = {k: v for k, v in result["counts"].items() if k not in ("200", "503_retry_after")}
    passed = (
        not bad
        and result["wrong_predictions"] == 0
        and result["healthz_failures"] == 0
        and after <= max(1.5 * before, before + 10)
        and result["rss_peak_mb"] < 1536
    )
    payload = {
        **result,
        "p50_before_ms": before,
        "p50_after_ms": after,
        "rss_after_mb": rss_after,
        "clients": clients,
        "seconds": seconds,
        "passed": passed,
    }
    report(
        "overload",
        [
            ("clients x seconds", f"{clients} x {seconds:g}"),
            ("responses", result["counts"]),
            ("wrong predictions", result["wrong_predictions"]),
            (
                "healthz failures / checks",
                f"{result['healthz_failures']} / {result['healthz_checks']}",
            ),
            ("RSS peak / after (MB)", f"{result['rss_peak_mb']} / {rss_after}"),
            ("1-client p50 before / after (ms)", f"{before} / {after}"),
            ("PASSED", passed),
        ],
        payload,
    )
    return passed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    sys.exit(0 if run(args.clients, min(args.seconds, 300.0)) else 1)
