"""Audit records: written before the 200, survive restarts, retention purges images (410)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from app.records import RecordStore
from tests.conftest import API_KEY, fixture_bytes, make_settings


def test_records_survive_restart_and_explain_still_works(tiny_store: Path, tmp_path: Path) -> None:
    image = fixture_bytes("originals/person495_bacteria_2094.jpeg")
    data_dir = tmp_path / "data"
    with TestClient(
        create_app(make_settings(tiny_store, data_dir)), headers={"X-API-Key": API_KEY}
    ) as client:
        body = client.post("/predict", files={"file": ("a.jpeg", image)}).json()
    with TestClient(
        create_app(make_settings(tiny_store, data_dir)), headers={"X-API-Key": API_KEY}
    ) as client:
        response = client.get(body["explain_url"] + "?num_samples=100")
        assert response.status_code == 200 and response.content[:4] == b"\x89PNG"
    db = sqlite3.connect(data_dir / "pneumoscan.sqlite3")
    row = db.execute(
        "SELECT key_id, model_version, label, p_pneumonia, image_sha256, "
        "input_format, width FROM predictions WHERE id = ?",
        (body["prediction_id"],),
    ).fetchone()
    assert row[0].startswith("key-") and API_KEY not in row[0]
    assert row[1:] == (
        1,
        body["label"],
        body["probabilities"]["PNEUMONIA"],
        body["input"]["sha256"],
        "JPEG",
        body["input"]["width"],
    )
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_expired_image_answers_410(tiny_store: Path, tmp_path: Path) -> None:
    image = fixture_bytes("originals/person495_bacteria_2094.jpeg")
    settings = make_settings(tiny_store, tmp_path / "data", retention_hours=0.0003)  # ~1 s
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
        body = client.post("/predict", files={"file": ("a.jpeg", image)}).json()
        time.sleep(1.3)
        response = client.get(body["explain_url"])
        assert response.status_code == 410
        assert response.json()["error"]["code"] == "expired"


def test_purge_removes_images_but_keeps_audit_rows(tmp_path: Path) -> None:
    import numpy as np

    from app.records import PredictionRecord

    store = RecordStore(tmp_path, retention_seconds=10)
    record = PredictionRecord(
        "a" * 32,
        time.time(),
        "key-x",
        "pneumonia",
        1,
        0.2,
        0.8,
        "PNEUMONIA",
        0.5,
        "0" * 64,
        "PNG",
        10,
        300,
        300,
    )
    store.add(record, np.zeros((224, 224), np.uint8))
    assert store.image(record.id) is not None
    assert store.purge(now=time.time() + 11) == 1
    assert store.image(record.id) is None and store.get(record.id) == record
    assert store.integrity_ok()
