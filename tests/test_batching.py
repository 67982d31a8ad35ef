"""Micro-batching gathers concurrent requests; a full queue answers 503 with Retry-After."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import API_KEY, fixture_bytes, make_settings


def slow_down(app, seconds: float) -> None:
    model = app.state.services.manager.current
    original = model.score  # what the micro-batcher calls (predict goes through it too)

    def slow(batch):
        time.sleep(seconds)
        return original(batch)

    model.score = slow


def hammer(client: TestClient, n: int, image: bytes | list[bytes]) -> list:
    """n concurrent uploads; a list of images is cycled through."""
    images = image if isinstance(image, list) else [image]
    responses: list = []
    lock = threading.Lock()

    def one(data: bytes) -> None:
        response = client.post("/predict", files={"file": ("a.jpeg", data)})
        with lock:
            responses.append(response)

    threads = [threading.Thread(target=one, args=(images[i % len(images)],)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return responses


def test_concurrent_requests_share_model_calls(tiny_store: Path, tmp_path: Path) -> None:
    image = fixture_bytes("chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg")
    app = create_app(make_settings(tiny_store, tmp_path / "d", batch_max_wait_ms=50))
    with TestClient(app, headers={"X-API-Key": API_KEY}) as client:
        slow_down(app, 0.2)
        responses = hammer(client, 12, image)
        assert {r.status_code for r in responses} == {200}
        sizes = [r.json()["timings"]["batch_size"] for r in responses]
        assert max(sizes) > 1
        probabilities = {round(r.json()["probabilities"]["PNEUMONIA"], 6) for r in responses}
        assert len(probabilities) == 1  # batching never mixes up answers


@pytest.mark.parametrize("instances", [1, 2])
def test_model_instances_bound_concurrent_model_calls(
    tiny_store: Path, tmp_path: Path, instances: int
) -> None:
    """With N instances up to N batches are in the model at once, never more, and every caller
    still gets its own image's answer."""
    normal = fixture_bytes("chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg")
    pneumonia = fixture_bytes("chest_xray/PNEUMONIA/person495_bacteria_2094.jpeg")
    # Batches of at most 4: the 16 uploads cannot all fit one batch, even when they pile up
    # behind a first one scored on the event loop.
    settings = make_settings(
        tiny_store, tmp_path / "d", model_instances=instances, batch_max_size=4
    )
    app = create_app(settings)
    with TestClient(app, headers={"X-API-Key": API_KEY}) as client:
        expected = [
            client.post("/predict", files={"file": ("a.jpeg", data)}).json()
            for data in (normal, pneumonia)
        ]
        model = app.state.services.manager.current
        original = model.score
        lock = threading.Lock()
        active = [0]
        peak = [0]

        def counted(batch):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            try:
                time.sleep(0.15)
                return original(batch)
            finally:
                with lock:
                    active[0] -= 1

        model.score = counted
        responses = hammer(client, 16, [normal, pneumonia])
        assert {r.status_code for r in responses} == {200}
        assert peak[0] == instances
        by_sha = {body["input"]["sha256"]: body["probabilities"] for body in expected}
        assert len(by_sha) == 2
        for response in responses:
            body = response.json()
            assert body["probabilities"] == pytest.approx(by_sha[body["input"]["sha256"]], abs=1e-6)


def test_instances_default_to_the_cpus_this_process_may_use(tmp_path: Path) -> None:
    import os

    from app.settings import Settings, usable_cpus

    cpus = len(os.sched_getaffinity(0))
    assert Settings(api_keys="k" * 16).instances == max(1, min(8, usable_cpus()))
    assert Settings(api_keys="k" * 16, model_instances=3).instances == 3
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(cpu_max) == cpus
    cpu_max.write_text("50000 100000\n")  # docker run --cpus 0.5
    assert usable_cpus(cpu_max) == 1
    cpu_max.write_text(f"{cpus * 300000} 100000\n")  # a quota above the affinity mask
    assert usable_cpus(cpu_max) == cpus
    assert usable_cpus(tmp_path / "absent") == cpus


def test_full_queue_answers_503_with_retry_after(tiny_store: Path, tmp_path: Path) -> None:
    image = fixture_bytes("chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg")
    settings = make_settings(
        tiny_store, tmp_path / "d", queue_max=2, batch_max_size=1, batch_max_wait_ms=0
    )
    app = create_app(settings)
    with TestClient(app, headers={"X-API-Key": API_KEY}) as client:
        slow_down(app, 0.3)
        responses = hammer(client, 12, image)
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
        for response in responses:
            if response.status_code == 503:
                assert response.headers["retry-after"].isdigit()
                assert response.json()["error"]["code"] == "overloaded"
        assert client.get("/healthz").status_code == 200
        assert client.post("/predict", files={"file": ("a.jpeg", image)}).status_code == 200


def test_model_threads_setting_reaches_tensorflow(tmp_path: Path) -> None:
    """PNEUMOSCAN_MODEL_THREADS sets TensorFlow's intra-op pool before the first op; in a
    process where TensorFlow already runs, the setting is reported, not crashed on."""
    from pydantic import ValidationError

    from app.classifier import configure_threads
    from app.settings import Settings
    from tests.utils.fresh_process import last_line

    code = (
        "import tensorflow as tf\n"
        "from app.classifier import configure_threads\n"
        "assert configure_threads(1) == 1\n"
        "tf.constant(1) + 1\n"
        "print(tf.config.threading.get_intra_op_parallelism_threads())\n"
    )
    assert last_line(code) == "1"
    import tensorflow as tf

    tf.constant(1) + 1  # this process's runtime is initialised by now
    before = tf.config.threading.get_intra_op_parallelism_threads()
    assert configure_threads(0) == before
    assert configure_threads(before + 3) == before
    with pytest.raises(ValidationError):
        Settings(model_threads=-1, api_keys="k" * 16)


def test_a_lone_request_is_scored_on_the_event_loop_and_a_crowd_on_the_instances(
    tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request at a time skips the two thread hand-offs; concurrent ones still go to the
    instance threads in batches, and both paths give the same answer."""
    # A generous limit: this test is about which path is taken, not about a busy CI's timings.
    monkeypatch.setattr("app.batching.INLINE_MAX_MS", 1000.0)
    image = fixture_bytes("chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg")
    app = create_app(make_settings(tiny_store, tmp_path / "d", batch_max_wait_ms=50))
    with TestClient(app, headers={"X-API-Key": API_KEY}) as client:
        model = app.state.services.manager.current
        original = model.score
        calls: list[tuple[str, int]] = []
        delay = [0.0]

        def recorded(batch):
            calls.append((threading.current_thread().name, len(batch)))
            time.sleep(delay[0])
            return original(batch)

        model.score = recorded
        lone = [client.post("/predict", files={"file": ("a.jpeg", image)}) for _ in range(4)]
        # The first call's cost is unknown, so it goes to an instance; the tiny model's is
        # under the limit, so the next three run on the loop.
        assert [name.startswith("inference") for name, _ in calls] == [True, False, False, False]
        delay[0] = 0.1
        crowd = hammer(client, 12, image)
        crowd_calls = calls[4:]
        assert {r.status_code for r in lone + crowd} == {200}
        # The first of the crowd may find the batcher idle; the rest queue behind it.
        assert sum(name.startswith("inference") for name, _ in crowd_calls) >= 1
        assert max(size for _, size in crowd_calls) > 1
        answers = {round(r.json()["probabilities"]["PNEUMONIA"], 6) for r in lone + crowd}
        assert len(answers) == 1


def test_a_slow_model_is_never_run_on_the_event_loop(
    tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a one-image call took longer than INLINE_MAX_MS, lone requests go to the instance
    threads, so a slow model cannot stall health checks; a fast call brings the loop path back."""
    monkeypatch.setattr("app.batching.INLINE_MAX_MS", 50.0)
    image = fixture_bytes("chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg")
    app = create_app(make_settings(tiny_store, tmp_path / "d"))
    with TestClient(app, headers={"X-API-Key": API_KEY}) as client:
        model = app.state.services.manager.current
        original = model.score
        calls: list[str] = []
        delay = [0.1]  # twice the limit

        def recorded(batch):
            calls.append(threading.current_thread().name)
            time.sleep(delay[0])
            return original(batch)

        model.score = recorded
        for _ in range(3):
            assert client.post("/predict", files={"file": ("a.jpeg", image)}).status_code == 200
        assert all(name.startswith("inference") for name in calls)
        delay[0] = 0.0
        for _ in range(3):
            assert client.post("/predict", files={"file": ("a.jpeg", image)}).status_code == 200
        assert [name.startswith("inference") for name in calls[3:]] == [True, False, False]
