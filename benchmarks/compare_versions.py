"""Raw speed of two model versions side by side, in alternating rounds (this VM's speed drifts,
so only numbers taken next to each other are compared).

python -m benchmarks.compare_versions [--a 2] [--b 3] [--rounds 6]

Made for v3 (v2 + the out-of-distribution output): does the second output cost anything?
Both versions are called through the service's loader (`load_version`) with the service's
thread setting, batch 1 and batch 32, one caller.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from app.classifier import configure_threads, load_version
from app.settings import Settings
from benchmarks.common import default_store, report


def per_call_ms(model, x: np.ndarray, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        model.score(x)
    return (time.perf_counter() - started) / calls * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=int, default=2)
    parser.add_argument("--b", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    settings = Settings()
    configure_threads(settings.model_threads)
    model_dir = default_store() / settings.model_name
    models = {v: load_version(model_dir, v) for v in (args.a, args.b)}
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, 224, 224, 1), dtype=np.uint8)
    many = rng.integers(0, 256, (32, 224, 224, 1), dtype=np.uint8)
    batch1: dict[int, list[float]] = {v: [] for v in models}
    batch32: dict[int, list[float]] = {v: [] for v in models}
    for model in models.values():
        per_call_ms(model, many, 5)
    for _ in range(args.rounds):
        for version, model in models.items():
            batch1[version].append(per_call_ms(model, one, 200))
            batch32[version].append(32_000 / per_call_ms(model, many, 20))
    rows = []
    payload: dict[str, object] = {"rounds": args.rounds}
    for version in models:
        b1, b32 = statistics.median(batch1[version]), statistics.median(batch32[version])
        outputs = "probabilities + ood_score" if models[version].ood_threshold else "probabilities"
        rows.append(
            (
                f"v{version} ({outputs})",
                f"batch 1 {b1:.3f} ms (rounds {min(batch1[version]):.3f}-"
                f"{max(batch1[version]):.3f}); batch 32 {b32:.0f} images/s "
                f"({min(batch32[version]):.0f}-{max(batch32[version]):.0f})",
            )
        )
        payload[f"v{version}"] = {"batch1_ms": round(b1, 3), "batch32_images_per_s": round(b32)}
    report("model versions side by side (median of alternating rounds)", rows, payload)


if __name__ == "__main__":
    main()
