"""Model store: versioning, checksums, corrupt versions skipped, hot switch without failures."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

import pytest

from app.classifier import ModelManager
from app.errors import ModelStoreError
from app.model_store import list_versions, publish_version, verify_version
from tests.conftest import API_KEY, fixture_bytes, make_settings, publish_tiny


def test_publish_is_max_plus_one_and_never_overwrites(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    (model_dir / "7").mkdir(parents=True)
    (model_dir / "7" / "keep").write_text("old")
    (model_dir / "notes").mkdir()
    (model_dir / "\u00b2").mkdir()  # a digit to str.isdigit, not a version
    version, folder = publish_version(model_dir, lambda f, v: (f / "x").write_text(str(v)))
    assert version == 8 and folder == model_dir / "8"
    assert (model_dir / "7" / "keep").read_text() == "old"
    assert (folder / "checksums.sha256").read_text().strip().endswith("  x")
    assert list_versions(model_dir) == [7, 8]
    assert not any(p.name.startswith(".tmp-") for p in model_dir.iterdir())


def test_exported_version_verifies(tiny_store: Path) -> None:
    card = verify_version(tiny_store / "pneumonia" / "1")
    assert card["input"]["dtype"] == "uint8"
    assert card["input"]["shape"] == [None, 224, 224, 1]


def copy_version(source: Path, model_dir: Path, version: int) -> Path:
    target = model_dir / str(version)
    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("damage", ["checksum", "no_variables", "no_card", "bad_json"])
def test_corrupt_versions_are_refused(tiny_store: Path, tmp_path: Path, damage: str) -> None:
    folder = copy_version(tiny_store / "pneumonia" / "1", tmp_path / "m", 2)
    if damage == "checksum":
        with open(folder / "saved_model.pb", "ab") as handle:
            handle.write(b"tamper")
    elif damage == "no_variables":
        shutil.rmtree(folder / "variables")
    elif damage == "no_card":
        (folder / "model.json").unlink()
    else:
        (folder / "model.json").write_text("{not json")
    with pytest.raises(ModelStoreError):
        verify_version(folder)


def test_manager_skips_corrupt_newer_version_and_keeps_serving(
    tiny_store: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "store" / "pneumonia"
    copy_version(tiny_store / "pneumonia" / "1", model_dir, 1)
    bad = copy_version(tiny_store / "pneumonia" / "1", model_dir, 2)
    (bad / "variables" / "variables.index").write_bytes(b"half-written")
    manager = ModelManager(tmp_path / "store", "pneumonia", None, 60)
    manager.refresh()
    assert manager.current is not None and manager.current.version == 1
    assert 2 in manager.failed and "checksum" in manager.failed[2]


def test_empty_store_is_not_ready_and_pinned_missing_is_refused(tmp_path: Path) -> None:
    """Each problem is logged once, not on every poll (before: an error every 5 s)."""
    said: list[str] = []

    class Collect(logging.Handler):  # on the logger itself: the app's may not propagate
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    logger, collect = logging.getLogger("pneumoscan.model"), Collect(logging.ERROR)
    logger.addHandler(collect)
    try:
        manager = ModelManager(tmp_path, "pneumonia", None, 60)
        for _ in range(3):
            manager.refresh()
        assert manager.current is None
        pinned = ModelManager(tmp_path, "pneumonia", 5, 60)
        for _ in range(3):
            pinned.refresh()
        assert pinned.current is None
    finally:
        logger.removeHandler(collect)
    assert len([m for m in said if m.startswith("no valid model version")]) == 2, said
    assert len([m for m in said if m.startswith("pinned version 5 not found")]) == 1, said


def test_pinned_version_is_served(tiny_store: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "store" / "pneumonia"
    for version in (1, 2, 3):
        copy_version(tiny_store / "pneumonia" / "1", model_dir, version)
    manager = ModelManager(tmp_path / "store", "pneumonia", 2, 60)
    manager.refresh()
    assert manager.current.version == 2


def test_hot_switch_under_load_without_failed_requests(tiny_store: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    store = tmp_path / "store"
    copy_version(tiny_store / "pneumonia" / "1", store / "pneumonia", 1)
    image = fixture_bytes("chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg")
    app = create_app(make_settings(store, tmp_path / "data", poll_seconds=0.1))
    statuses: list[int] = []
    versions: set[int] = set()
    stop = threading.Event()
    with TestClient(app, headers={"X-API-Key": API_KEY}) as client:
        assert client.get("/readyz").json()["model"]["version"] == 1

        def hammer() -> None:
            while not stop.is_set():
                response = client.post("/predict", files={"file": ("a.jpeg", image)})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    versions.add(response.json()["model"]["version"])

        workers = [threading.Thread(target=hammer) for _ in range(3)]
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        publish_tiny(store / "pneumonia", bias=3.0)  # version 2, published atomically
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and 2 not in versions:
            time.sleep(0.1)
        time.sleep(0.3)
        stop.set()
        for worker in workers:
            worker.join()
        assert client.get("/readyz").json()["model"]["version"] == 2
        # The store emptied while serving: the loaded version keeps answering.
        shutil.rmtree(store / "pneumonia")
        time.sleep(0.5)
        assert client.post("/predict", files={"file": ("a.jpeg", image)}).status_code == 200
    assert versions == {1, 2}
    assert statuses and set(statuses) == {200}


def test_explanation_is_drawn_by_the_version_that_made_the_prediction(
    tiny_store: Path, tmp_path: Path
) -> None:
    """After a switch, an earlier prediction is still explained by its own model (kept in
    memory, or loaded back from the store); if that version is gone, 409, never an overlay
    drawn by another model."""
    from fastapi.testclient import TestClient

    from app.explain import explain, overlay_png
    from app.main import create_app

    store = tmp_path / "store"
    copy_version(tiny_store / "pneumonia" / "1", store / "pneumonia", 1)
    image = fixture_bytes("chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg")
    app = create_app(make_settings(store, tmp_path / "data", poll_seconds=3600))
    with TestClient(app, headers={"X-API-Key": API_KEY}) as client:
        services = app.state.services
        v1 = services.manager.get()
        first = client.post("/predict", files={"file": ("a.jpeg", image)}).json()
        assert first["model"]["version"] == 1
        publish_tiny(store / "pneumonia", bias=3.0)  # version 2: other weights, other answers
        services.manager.refresh()
        assert services.manager.get().version == 2
        url = f"/explain/{first['prediction_id']}?num_samples=200"
        response = client.get(url)
        assert response.status_code == 200 and response.headers["x-model-version"] == "1"
        pixels = services.records.image(first["prediction_id"])
        mask, _ = explain(pixels, v1.predict, v1.class_names, first["label"], 200, 5)
        assert response.content == overlay_png(pixels, mask, first["label"])
        # Not in memory any more: loaded back from the store.
        services.manager._retired.clear()
        again = client.get(url + "&num_features=4")
        assert again.status_code == 200 and again.headers["x-model-version"] == "1"
        # Gone from the store and from memory: refused, not explained by version 2.
        shutil.rmtree(store / "pneumonia" / "1")
        services.manager._retired.clear()
        gone = client.get(url + "&num_features=3")
        assert gone.status_code == 409
        assert gone.json()["error"]["code"] == "model_version_unavailable"
        # A prediction of the serving version is explained as before.
        second = client.post("/predict", files={"file": ("a.jpeg", image)}).json()
        latest = client.get(f"/explain/{second['prediction_id']}?num_samples=200")
        assert latest.status_code == 200 and latest.headers["x-model-version"] == "2"
