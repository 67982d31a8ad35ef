"""Raw model ceiling: the served SavedModel in-process, batch-1 latency and batch-32 throughput.

python -m benchmarks.model [--model model_store/pneumonia/<v>]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from app.classifier import load_version
from app.model_store import list_versions
from benchmarks.common import default_store, percentiles, report


def measure(model, batch: int, seconds: float) -> list[float]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, 224, 224, 1), dtype=np.uint8)
    for _ in range(3):
        model.predict(x)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        model.predict(x)
        times.append(time.perf_counter() - t)
    return times


def run(model_dir=None, seconds: float = 8.0) -> dict:
    model_dir = model_dir or default_store() / "pneumonia"
    version = max(list_versions(model_dir))
    model = load_version(model_dir, version)
    b1 = [t * 1000 for t in measure(model, 1, seconds)]
    b32 = measure(model, 32, seconds)
    result = {
        "version": version,
        "batch1_ms": percentiles(b1, (50, 95)),
        "batch32_images_per_s": round(32 * len(b32) / sum(b32), 1),
    }
    report(
        "raw model (SavedModel in-process)",
        [
            ("model version", version),
            (
                "batch 1 p50 / p95 (ms)",
                f"{result['batch1_ms']['p50']} / {result['batch1_ms']['p95']}",
            ),
            ("batch 32 throughput (img/s)", result["batch32_images_per_s"]),
        ],
        result,
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    run(seconds=args.seconds)
