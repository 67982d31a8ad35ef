"""The service on LiteRT against the service on TensorFlow's runtime, side by side.

python -m benchmarks.runtime_service [--rounds 3] [--seconds 8]

Two `pneumoscan serve` processes on loopback, one per PNEUMOSCAN_MODEL_RUNTIME ('auto', which
runs the version's model.tflite, and 'savedmodel'), measured in alternating rounds so both see
the same machine state (this VM's speed drifts within minutes): one client's p50 for a 224 px
JPEG (multipart), 32 clients (wrk when installed) images/s, and a cold explanation (1000 LIME
samples). Medians of the rounds; only one server is under load at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks.common import SHARED, default_store, percentiles, report, rss_mb, running_server
from benchmarks.service import explain_latency, many_clients, many_clients_wrk, one_client

RUNTIMES = ("auto", "savedmodel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    image = (SHARED / "chest_xray" / "train" / "NORMAL" / "IM-0115-0001.jpeg").read_bytes()
    measured: dict[str, dict[str, list[float]]] = {
        runtime: {"one_client_p50_ms": [], "clients32_images_per_s": [], "explain_cold_ms": []}
        for runtime in RUNTIMES
    }
    errors = dict.fromkeys(RUNTIMES, 0)
    with contextlib.ExitStack() as stack:
        servers = {}
        for runtime in RUNTIMES:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            servers[runtime] = stack.enter_context(
                running_server(
                    default_store(), data_dir, extra_env={"PNEUMOSCAN_MODEL_RUNTIME": runtime}
                )
            )
        for server in servers.values():  # warm both
            one_client(server["url"], image, 50)
        for _ in range(args.rounds):
            for runtime, server in servers.items():
                url = server["url"]
                one = percentiles(one_client(url, image, 200), (50,))["p50"]
                if shutil.which("wrk"):
                    level = many_clients_wrk(url, image, 32, args.seconds)
                else:
                    level = asyncio.run(many_clients(url, image, 32, args.seconds))
                cold = explain_latency(url, image, 2)["cold_ms"]["p50"]
                errors[runtime] += level["errors"]
                measured[runtime]["one_client_p50_ms"].append(one)
                measured[runtime]["clients32_images_per_s"].append(level["images_per_s"])
                measured[runtime]["explain_cold_ms"].append(cold)
        rss = {runtime: rss_mb(server["pid"]) for runtime, server in servers.items()}
        ready = {runtime: round(server["ready_s"], 2) for runtime, server in servers.items()}
    medians = {
        runtime: {key: round(statistics.median(v), 2) for key, v in values.items()}
        for runtime, values in measured.items()
    }
    result = {
        "rounds": measured,
        "medians": medians,
        "errors": errors,
        "rss_mb": rss,
        "start_to_ready_s": ready,
    }
    rows = []
    for key in ("one_client_p50_ms", "clients32_images_per_s", "explain_cold_ms"):
        rows.append(
            (
                f"{key}: LiteRT, TensorFlow (median; rounds)",
                f"{medians['auto'][key]}, {medians['savedmodel'][key]} "
                f"({measured['auto'][key]}; {measured['savedmodel'][key]})",
            )
        )
    rows += [
        ("errors at 32 clients: LiteRT, TensorFlow", f"{errors['auto']}, {errors['savedmodel']}"),
        ("RSS after (MB): LiteRT, TensorFlow", f"{rss['auto']}, {rss['savedmodel']}"),
        ("start to ready (s): LiteRT, TensorFlow", f"{ready['auto']}, {ready['savedmodel']}"),
    ]
    report("service: LiteRT runtime vs TensorFlow runtime", rows, result)


if __name__ == "__main__":
    main()
