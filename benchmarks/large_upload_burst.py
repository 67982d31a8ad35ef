"""A burst of large DICOM uploads: does the upload memory budget bound the process?

    python -m benchmarks.large_upload_burst [--clients 24] [--per-client 3] [--side 3000]

Starts `pneumoscan serve` on loopback (settings from the environment, so
`PNEUMOSCAN_MAX_INFLIGHT_UPLOAD_BYTES` can be varied), builds one 12-bit DICOM of a real
radiograph at --side x 1.17 --side pixels (21 MB at 3000), and has every client post it
--per-client times as the request body, at once, without retrying. Reports the answer codes,
the server's peak and final RSS (sampled every 50 ms), the latency and whether /healthz still
answers. Passing means: only 200 and 503 `overloaded` with Retry-After, every 200 PNEUMONIA or
NORMAL with the same probability, and the service healthy afterwards.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.common import (
    BENCH_KEY,
    SHARED,
    default_store,
    percentiles,
    report,
    rss_mb,
    running_server,
)
from tests.utils.dicom_factory import make_dicom


def burst(url: str, pid: int, body: bytes, clients: int, per_client: int) -> dict:
    answers: list[tuple[int, float, str | None, float | None]] = []
    peak = [0.0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.05)

    def client() -> None:
        headers = {"X-API-Key": BENCH_KEY, "Content-Type": "application/dicom"}
        with httpx.Client(base_url=url, headers=headers, timeout=120) as session:
            for _ in range(per_client):
                started = time.perf_counter()
                response = session.post("/predict", content=body)
                elapsed = (time.perf_counter() - started) * 1000
                payload = response.json()
                if response.status_code == 200:
                    p = payload["probabilities"]["PNEUMONIA"]
                    answers.append((200, elapsed, None, p))
                else:
                    code = payload["error"]["code"]
                    retry = response.headers.get("retry-after")
                    answers.append((response.status_code, elapsed, f"{code}/{retry}", None))

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    done.set()
    watcher.join()
    codes: dict[str, int] = {}
    for status, _, detail, _ in answers:
        key = str(status) if detail is None else f"{status} {detail}"
        codes[key] = codes.get(key, 0) + 1
    probabilities = {round(p, 6) for *_, p in answers if p is not None}
    ok_ms = [ms for status, ms, _, _ in answers if status == 200]
    return {
        "requests": len(answers),
        "codes": codes,
        "distinct_probabilities": len(probabilities),
        "wall_s": round(wall, 2),
        "ok_per_s": round(len(ok_ms) / wall, 1),
        "ok_latency_ms": percentiles(ok_ms) if ok_ms else {},
        "peak_rss_mb": round(peak[0]),
        "rss_after_mb": round(rss_mb(pid)),
        "healthz": httpx.get(f"{url}/healthz", timeout=10).status_code,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--per-client", type=int, default=3)
    parser.add_argument("--side", type=int, default=3000)
    args = parser.parse_args()
    source = sorted((SHARED / "originals" / "train" / "PNEUMONIA").iterdir())[0]
    size = (args.side, round(args.side * 3500 / 3000))
    pixels = np.asarray(Image.open(source).convert("L").resize(size))
    body = make_dicom(pixels, bits=12, window=(2048, 4096))
    with (
        tempfile.TemporaryDirectory() as data_dir,
        running_server(default_store(), Path(data_dir)) as server,
    ):
        result = burst(server["url"], server["pid"], body, args.clients, args.per_client)
    result = {"dicom_mb": round(len(body) / 1e6, 1), "clients": args.clients, **result}
    result["passed"] = (
        all(code == "200" or code.startswith("503 overloaded/") for code in result["codes"])
        and result["distinct_probabilities"] <= 1
        and result["healthz"] == 200
    )
    report(
        "large DICOM burst",
        [
            (
                "DICOM size (MB), clients x requests",
                f"{result['dicom_mb']}, {args.clients} x {args.per_client}",
            ),
            ("answers", result["codes"]),
            ("distinct P(pneumonia) among the 200s", result["distinct_probabilities"]),
            (
                "200s per s; their p50 / p95 (ms)",
                f"{result['ok_per_s']}; "
                f"{result['ok_latency_ms'].get('p50')} / {result['ok_latency_ms'].get('p95')}",
            ),
            ("server RSS peak / after (MB)", f"{result['peak_rss_mb']} / {result['rss_after_mb']}"),
            ("/healthz after", result["healthz"]),
            ("passed", result["passed"]),
        ],
        result,
    )
    if not result["passed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
