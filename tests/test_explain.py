"""LIME finds the regions a model looks at, with or without a thread pool for the model calls."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from app.explain import explain

CLASSES = ["NORMAL", "PNEUMONIA"]


def radiograph_like() -> np.ndarray:
    y, x = np.mgrid[0:224, 0:224]
    return (60 + 120 * np.exp(-(((x - 112) / 70) ** 2 + ((y - 112) / 90) ** 2))).astype(np.uint8)


def test_pooled_lime_matches_sequential_and_finds_the_driving_region() -> None:
    pixels = radiograph_like()
    threads: set[str] = set()

    def predict(batch: np.ndarray) -> np.ndarray:
        # "Pneumonia" is how much of the upper-left quadrant is visible.
        threads.add(threading.current_thread().name)
        visible = (batch[:, :112, :112, 0] > 0).mean(axis=(1, 2))
        return np.stack([1 - visible, visible], axis=1)

    sequential, chosen = explain(pixels, predict, CLASSES, "PNEUMONIA", 1000, 3, seed=7)
    with ThreadPoolExecutor(2, thread_name_prefix="lime-test") as pool:
        pooled, chosen_pooled = explain(
            pixels, predict, CLASSES, "PNEUMONIA", 1000, 3, seed=7, pool=pool
        )
    assert chosen == chosen_pooled and np.array_equal(sequential, pooled)
    assert any(name.startswith("lime-test") for name in threads)
    assert chosen, "the regions that drive the call have positive weight"
    # Most of the highlighted area lies in the quadrant the fake model looks at.
    assert sequential[:112, :112].sum() / sequential.sum() > 0.8
