"""The service over real HTTP (uvicorn on loopback) against the raw model, in one run.

    python -m benchmarks.service [--seconds 10]

Measures: start to /readyz; one client p50/p95/p99 for 224 px and full-resolution JPEGs and the
ratio to decode + raw batch-1 (alternating rounds, so both sides see the same machine state);
1/8/32 concurrent clients (bounded by time) with throughput, errors, p95, mean batch and the
ratio to raw batch-32 measured just before and after that level; /explain cold and cached; LIME
region stability across two seeds; RSS after the load.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TQDM_DISABLE", "1")

import httpx
import numpy as np

from app.settings import Settings
from benchmarks import model as model_bench
from benchmarks import preprocess as preprocess_bench
from benchmarks.common import (
    BENCH_KEY,
    SHARED,
    default_store,
    multipart,
    percentiles,
    report,
    rss_mb,
    running_server,
    wrk_script,
)


def one_client(url: str, data: bytes, n: int, raw_body: bool = False) -> list[float]:
    """Sequential requests on one keep-alive connection from the standard library's client,
    which adds far less of its own time than httpx (this is the service's latency, not the
    client's). Multipart by default; `raw_body` sends the bytes as an image/jpeg body."""
    body, headers = multipart(data)
    if raw_body:
        body, headers = data, {**headers, "Content-Type": "image/jpeg"}
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    times = []
    try:
        for index in range(n + 5):
            t = time.perf_counter()
            connection.request("POST", "/predict", body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"/predict answered {response.status}")
            if index >= 5:  # the first few warm the connection and the caches
                times.append((time.perf_counter() - t) * 1000)
    finally:
        connection.close()
    return times


def interleaved_one_client(
    url: str, model, data: bytes, rounds: int, n: int, raw_body: bool = False
) -> dict:
    """One client against its yardstick, in alternating rounds: n x (decode + raw batch-1 model
    in this process), then n sequential HTTP requests. On a shared VM the speed of the machine
    drifts by more than the effect measured within minutes; alternating lets both sides of the
    ratio see the same state, and the median over rounds is reported."""
    from app.imaging import decode_image

    ratios, http_all, base_all = [], [], []
    for _ in range(rounds):
        base = []
        for _ in range(n):
            t = time.perf_counter()
            model.predict(decode_image(data).pixels[None, :, :, None])
            base.append((time.perf_counter() - t) * 1000)
        http = one_client(url, data, n, raw_body)
        ratios.append(float(np.median(http) / np.median(base)))
        http_all += http
        base_all += base
    return {
        **percentiles(http_all),
        "decode_plus_batch1_p50": round(float(np.median(base_all)), 2),
        "ratio_p50_to_decode_plus_batch1": round(float(np.median(ratios)), 2),
        "ratio_per_round": [round(r, 2) for r in ratios],
    }


def raw_batch32_now(model, seconds: float, callers: int) -> float:
    """Raw batch-32 images/s measured right now, next to the load level it is compared with:
    the better of one caller and `callers` concurrent callers."""
    return model_bench.ceiling_batch32(model, seconds / 2, callers)["best"]


def raw_reference(seconds: float, *options: str) -> dict:
    """The raw model with other `options` for benchmarks.model, in a process of its own
    (TensorFlow fixes its thread count per process): '--threads 0', the runtime's default
    thread count, is the yardstick the service's own setting has to beat; '--runtime
    savedmodel' is TensorFlow's runtime, which served every version before model.tflite."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.model", *options, "--seconds", str(seconds)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def batch_totals(url: str) -> tuple[float, float]:
    """(images, model calls) so far, from the service's own batch-size histogram."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for name in ("pneumoscan_batch_size_sum", "pneumoscan_batch_size_count"):
            if line.startswith(name + " ") or line.startswith(name + "{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values.get("pneumoscan_batch_size_sum", 0.0), values.get(
        "pneumoscan_batch_size_count", 0.0
    )


def with_batch_size(url: str, measure) -> dict:
    """Run one load level and add the mean number of images per model call during it."""
    images_before, calls_before = batch_totals(url)
    result = measure()
    images, calls = batch_totals(url)
    calls -= calls_before
    return {**result, "mean_batch": round((images - images_before) / calls, 1) if calls else 0.0}


async def many_clients(url: str, data: bytes, clients: int, seconds: float) -> dict:
    body, headers = multipart(data)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    end = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def worker() -> None:
            while time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    response = await client.post(f"{url}/predict", content=body, headers=headers)
                    code = response.status_code
                except httpx.HTTPError:
                    code = -1
                latencies.append((time.perf_counter() - t) * 1000)
                statuses[code] = statuses.get(code, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    ok = statuses.get(200, 0)
    return {
        "clients": clients,
        "requests": sum(statuses.values()),
        "ok": ok,
        "errors": sum(v for k, v in statuses.items() if k != 200),
        "images_per_s": round(ok / elapsed, 1),
        **percentiles(latencies, (50, 95)),
    }


WRK_SCRIPT = """
local f = io.open("{body}", "rb"); local body = f:read("*all"); f:close()
wrk.method = "POST"; wrk.body = body
wrk.headers["Content-Type"] = "{content_type}"
wrk.headers["X-API-Key"] = "{key}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT %d %d %d %d %d %d %.3f %.3f %.3f\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, e.timeout, 0,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000))
end
"""


def many_clients_wrk(url: str, data: bytes, clients: int, seconds: float) -> dict:
    """The same load from wrk, a C client: on a 2-core host a Python client spends as much CPU
    as the server it measures, so the Python figure understates the service."""
    with tempfile.TemporaryDirectory() as folder:
        script = wrk_script(Path(folder), WRK_SCRIPT, data)
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{clients}",
                f"-d{seconds:g}s",
                "--timeout",
                "30s",
                "-s",
                str(script),
                f"{url}/predict",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
    fields = next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1:]
    requests, duration_us, socket_errors, non_2xx = (int(v) for v in fields[:4])
    p50, p95, p99 = (float(v) for v in fields[6:9])
    return {
        "clients": clients,
        "client": "wrk",
        "requests": requests,
        "ok": requests - non_2xx,
        "errors": socket_errors + non_2xx,
        "images_per_s": round((requests - non_2xx) / (duration_us / 1e6), 1),
        "p50": round(p50, 2),
        "p95": round(p95, 2),
        "p99": round(p99, 2),
    }


def explain_latency(url: str, data: bytes, n: int) -> dict:
    body, headers = multipart(data)
    cold, cached = [], []
    with httpx.Client(timeout=120, headers={"X-API-Key": BENCH_KEY}) as client:
        for _ in range(n):
            prediction = client.post(f"{url}/predict", content=body, headers=headers).json()
            t = time.perf_counter()
            client.get(f"{url}{prediction['explain_url']}").raise_for_status()
            cold.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            client.get(f"{url}{prediction['explain_url']}").raise_for_status()
            cached.append((time.perf_counter() - t) * 1000)
    return {"cold_ms": percentiles(cold, (50, 95)), "cached_ms": percentiles(cached, (50, 95))}


def lime_stability(model, samples: int, features: int, per_class: int = 3) -> dict:
    """Jaccard overlap of the explained pixels between two LIME seeds, on the first `per_class`
    NORMAL and PNEUMONIA originals, and the seconds per explanation (one at a time)."""
    from app.explain import explain
    from app.imaging import decode_image

    scores, seconds = [], []
    for label in ("NORMAL", "PNEUMONIA"):
        for path in sorted((SHARED / "originals" / "train" / label).iterdir())[:per_class]:
            pixels = decode_image(path.read_bytes()).pixels
            p = model.predict(pixels[None, :, :, None])[0, 1]
            predicted = "PNEUMONIA" if p >= model.threshold else "NORMAL"
            masks = []
            for seed in (1, 2):
                started = time.perf_counter()
                mask, _ = explain(
                    pixels,
                    model.predict,
                    model.class_names,
                    predicted,
                    samples,
                    features,
                    seed=seed,
                )
                seconds.append(time.perf_counter() - started)
                masks.append(mask)
            union = np.logical_or(*masks).sum()
            scores.append(float(np.logical_and(*masks).sum() / union) if union else 1.0)
    return {
        "images": len(scores),
        "mean_jaccard": round(float(np.mean(scores)), 3),
        "median_jaccard": round(float(np.median(scores)), 3),
        "min_jaccard": round(float(np.min(scores)), 3),
        "seconds_p50": round(float(np.median(seconds)), 2),
    }


def one_client_rows(label: str, measured: dict) -> list[tuple[str, str]]:
    return [
        (
            f"{label} p50/p95/p99 (ms)",
            f"{measured['p50']} / {measured['p95']} / {measured['p99']}",
        ),
        (
            "  ratio p50 / (decode + raw b1), median of rounds (per round)",
            f"{measured['ratio_p50_to_decode_plus_batch1']} {measured['ratio_per_round']}",
        ),
    ]


def run(seconds: float) -> dict:
    reference = raw_reference(4, "--threads", "0")
    tensorflow = raw_reference(4, "--runtime", "savedmodel")
    loaded = model_bench.load_served()
    model = loaded[0]
    raw = model_bench.run(seconds=5, loaded=loaded)
    callers = Settings().instances
    decode = preprocess_bench.run()
    small = (SHARED / "chest_xray" / "train" / "NORMAL" / "IM-0115-0001.jpeg").read_bytes()
    name, full = preprocess_bench.median_original()
    with (
        tempfile.TemporaryDirectory() as data_dir,
        running_server(default_store(), Path(data_dir)) as server,
    ):
        url = server["url"]
        single_small = interleaved_one_client(url, model, small, rounds=5, n=60)
        single_full = interleaved_one_client(url, model, full, rounds=3, n=40)
        single_raw = interleaved_one_client(url, model, small, rounds=5, n=60, raw_body=True)
        concurrency = []
        for clients in (1, 8, 32):
            before = raw_batch32_now(model, 4, callers)
            if shutil.which("wrk"):
                level = with_batch_size(
                    url, lambda c=clients: many_clients_wrk(url, small, c, seconds)
                )
            else:
                level = with_batch_size(
                    url,
                    lambda c=clients: {
                        **asyncio.run(many_clients(url, small, c, seconds)),
                        "client": "httpx",
                    },
                )
            raw_now = (before + raw_batch32_now(model, 4, callers)) / 2
            concurrency.append(
                {
                    **level,
                    "raw_batch32_images_per_s": round(raw_now, 1),
                    "ratio_to_raw_batch32": round(level["images_per_s"] / raw_now, 2),
                }
            )
        explain = explain_latency(url, full, 5)
        rss = rss_mb(server["pid"])
        ready_s = round(server["ready_s"], 2)
    stability = lime_stability(model, 1000, 5)
    result = {
        "start_to_ready_s": ready_s,
        "rss_after_load_mb": rss,
        "one_client_224": single_small,
        "one_client_full": single_full,
        "one_client_224_raw_body": single_raw,
        "concurrency": concurrency,
        "explain": explain,
        "lime_stability_seeds_1_vs_2": stability,
        "raw": raw,
        "raw_default_threads": reference,
        "raw_tensorflow_runtime": tensorflow,
        "decode": decode["decode_ms"],
    }
    rows = [
        (
            f"raw b1 p50 (ms) / b32 img/s ({raw['runtime']}): service's threads, default threads",
            f"{raw['batch1_ms']['p50']} / {raw['batch32_images_per_s']}, "
            f"{reference['batch1_ms']['p50']} / {reference['batch32_images_per_s']}",
        ),
        (
            "raw b1 p50 (ms) / b32 img/s on TensorFlow's runtime (for comparison only)",
            f"{tensorflow['batch1_ms']['p50']} / {tensorflow['batch32_images_per_s']}",
        ),
        ("start to ready (s)", ready_s),
        ("RSS after load (MB)", rss),
        *one_client_rows("1 client 224 px", single_small),
        *one_client_rows("1 client 224 px, bytes as the body (no multipart)", single_raw),
        *one_client_rows(f"1 client full-res {name}", single_full),
    ]
    for c in result["concurrency"]:
        rows.append(
            (
                f"{c['clients']} clients ({c['client']}): img/s, errors, p95 ms, mean batch, "
                "raw b32 then, ratio",
                f"{c['images_per_s']}, {c['errors']}, {c['p95']}, {c['mean_batch']}, "
                f"{c['raw_batch32_images_per_s']}, {c['ratio_to_raw_batch32']}",
            )
        )
    rows += [
        ("explain cold p50/p95 (ms)", f"{explain['cold_ms']['p50']} / {explain['cold_ms']['p95']}"),
        (
            "explain cached p50/p95 (ms)",
            f"{explain['cached_ms']['p50']} / {explain['cached_ms']['p95']}",
        ),
        (
            "LIME region Jaccard, seeds 1 vs 2 (mean/min)",
            f"{stability['mean_jaccard']} / {stability['min_jaccard']}",
        ),
    ]
    report("service over HTTP vs raw model", rows, result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="duration of each concurrency level"
    )
    run(parser.parse_args().seconds)
