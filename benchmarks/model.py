"""Raw model ceiling: the served SavedModel in-process, batch-1 latency and batch-32 throughput.

python -m benchmarks.model [--threads N] [--callers N] [--seconds S] [--runtime R]

TensorFlow fixes its intra-op thread count once per process, so one run measures one setting
(default: the service's, PNEUMOSCAN_MODEL_THREADS). Batch-32 throughput is measured with one
caller and with `callers` concurrent callers (the service's model instances); the higher is
the ceiling the service is compared with.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from app.classifier import configure_threads, load_version
from app.model_store import list_versions
from app.settings import Settings
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


def throughput(model, batch: int, seconds: float, callers: int = 1) -> float:
    """Images/s with `callers` threads each calling the model back to back."""
    if callers == 1:
        times = measure(model, batch, seconds)
        return batch * len(times) / sum(times)
    counts = [0] * callers
    started = time.perf_counter()

    def caller(index: int) -> None:
        counts[index] = len(measure(model, batch, seconds))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return batch * sum(counts) / (time.perf_counter() - started)


def ceiling_batch32(model, seconds: float, callers: int) -> dict[str, float]:
    """Batch-32 images/s with one caller and with `callers`; `best` is the ceiling."""
    one = throughput(model, 32, seconds)
    many = throughput(model, 32, seconds, callers) if callers > 1 else one
    return {
        "one_caller": round(one, 1),
        f"{callers}_callers": round(many, 1),
        "best": max(one, many),
    }


def load_served(threads: int | None = None, runtime: str | None = None):
    """Set TensorFlow's threads (default: the service's setting) and load the version the
    service would serve, on the service's runtime unless `runtime` says otherwise ('auto':
    LiteRT when the version has model.tflite; 'savedmodel': TensorFlow); returns (model,
    threads in effect)."""
    settings = Settings()
    in_effect = configure_threads(settings.model_threads if threads is None else threads)
    model_dir = default_store() / "pneumonia"
    version = max(list_versions(model_dir))
    lite_threads = settings.model_threads if threads is None else threads
    return load_version(
        model_dir, version, runtime or settings.model_runtime, lite_threads
    ), in_effect


def run(
    seconds: float = 8.0,
    threads: int | None = None,
    callers: int | None = None,
    loaded=None,
    runtime: str | None = None,
) -> dict:
    """`loaded`: a (model, threads in effect) pair from `load_served`, to measure that one."""
    callers = callers or Settings().instances
    model, in_effect = loaded or load_served(threads, runtime)
    version = model.version
    b1 = [t * 1000 for t in measure(model, 1, seconds)]
    b32 = ceiling_batch32(model, seconds, callers)
    result = {
        "version": version,
        "runtime": model.runtime,
        "intra_op_threads": in_effect or "default",
        "batch1_ms": percentiles(b1, (50, 95)),
        "batch32": b32,
        "batch32_images_per_s": round(b32["best"], 1),
    }
    report(
        "raw model (in-process, the service's loader)",
        [
            ("model version, runtime", f"{version}, {model.runtime}"),
            ("TensorFlow intra-op threads", result["intra_op_threads"]),
            (
                "batch 1 p50 / p95 (ms)",
                f"{result['batch1_ms']['p50']} / {result['batch1_ms']['p95']}",
            ),
            (
                f"batch 32 img/s: one caller, {callers} callers",
                f"{b32['one_caller']}, {b32[f'{callers}_callers']}",
            ),
        ],
        result,
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (0 = TensorFlow's default)"
    )
    parser.add_argument("--callers", type=int, default=None, help="concurrent batch-32 callers")
    parser.add_argument(
        "--runtime",
        choices=("auto", "savedmodel"),
        default=None,
        help="default: the service's (PNEUMOSCAN_MODEL_RUNTIME)",
    )
    args = parser.parse_args()
    run(seconds=args.seconds, threads=args.threads, callers=args.callers, runtime=args.runtime)
