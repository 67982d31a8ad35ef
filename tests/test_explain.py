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


def test_concurrent_requests_for_one_explanation_share_one_computation(
    tiny_store, tmp_path, monkeypatch
) -> None:
    """A double click or a viewer's prefetch must not run LIME twice for the same overlay."""
    import time

    from fastapi.testclient import TestClient

    import app.routes.explain as route
    from app.main import create_app
    from tests.conftest import API_KEY, fixture_bytes, make_settings

    calls = []
    real = route.explain

    def slow_explain(*args, **kwargs):
        calls.append(1)
        time.sleep(0.5)  # long enough for the other requests to arrive meanwhile
        return real(*args, **kwargs)

    monkeypatch.setattr(route, "explain", slow_explain)
    image = fixture_bytes("chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg")
    app = create_app(make_settings(tiny_store, tmp_path / "d"))
    with TestClient(app, headers={"X-API-Key": API_KEY}) as client:
        pid = client.post("/predict", files={"file": ("a.jpeg", image)}).json()["prediction_id"]
        url = f"/explain/{pid}?num_samples=200"
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: client.get(url), range(4)))
        assert [r.status_code for r in responses] == [200] * 4
        assert len({r.content for r in responses}) == 1
        assert len(calls) == 1
        assert app.state.services.explain_inflight == {}
        assert client.get(url).headers["x-cache"] == "hit"
        assert len(calls) == 1
