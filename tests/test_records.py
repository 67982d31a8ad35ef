"""Audit records: written before the 200, survive restarts, retention purges images (410)."""

from __future__ import annotations

import logging
import re
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app import records as records_module
from app.main import create_app
from app.records import PredictionRecord, RecordStore
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


def _record(index: int) -> PredictionRecord:
    return PredictionRecord(
        f"{index:032x}", time.time(), "key-x", "pneumonia", 1, 0.2, 0.8, "PNEUMONIA", 0.5,
        "0" * 64, "PNG", 10, 300, 300,
    )  # fmt: skip


def _log_pages_after_one_more_write(store: RecordStore, index: int) -> int:
    """Pages in the write-ahead log once one more row is committed: a dozen if the log started
    over from its beginning, the whole history if it did not."""
    store.add(_record(index), np.zeros((224, 224), np.uint8))
    with store._lock:
        return store._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]


def test_commits_never_checkpoint_inline(tmp_path: Path) -> None:
    """A request's commit must not pay for a checkpoint (SQLite's default did, every ~54th
    prediction): with the background one idle, the log just grows past SQLite's 1000 pages."""
    store = RecordStore(tmp_path, 3600, checkpoint_interval_s=3600)
    assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    for index in range(120):  # ~12 pages (a 49 KB image) each
        store.add(_record(index), np.zeros((224, 224), np.uint8))
    wal = tmp_path / "pneumoscan.sqlite3-wal"
    assert wal.stat().st_size > 1200 * 4096
    store.close()
    assert not wal.exists() or wal.stat().st_size == 0  # closing checkpoints the rest
    reopened = RecordStore(tmp_path, 3600)
    assert reopened.count() == 120 and reopened.integrity_ok()
    reopened.close()


def test_checkpoint_lets_a_long_log_start_over(tmp_path: Path) -> None:
    store = RecordStore(tmp_path, 3600, checkpoint_interval_s=3600, wal_restart_pages=100)
    for index in range(60):
        store.add(_record(index), np.zeros((224, 224), np.uint8))
    other = sqlite3.connect(store.path, isolation_level=None)
    store.checkpoint(other)
    other.close()
    assert store.checkpoints == 1
    assert _log_pages_after_one_more_write(store, 60) < 100
    assert store.count() == 61 and store.integrity_ok()
    store.close()


def test_background_checkpointer_runs_after_writes(tmp_path: Path) -> None:
    store = RecordStore(tmp_path, 3600, checkpoint_interval_s=0.05)
    store.add(_record(0), np.zeros((224, 224), np.uint8))
    deadline = time.monotonic() + 10
    while store.checkpoints == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert store.checkpoints >= 1
    store.close()
    assert not store._checkpointer.is_alive()


def test_log_stays_bounded_under_sustained_writes(tmp_path: Path) -> None:
    """Commits landing during every checkpoint would keep the log from starting over; the
    checkpointer then finishes with the writers held off, so the log stays near one interval's
    worth of writes instead of growing with everything written."""
    store = RecordStore(tmp_path, 3600, checkpoint_interval_s=0.05, wal_restart_pages=256)
    wal = tmp_path / "pneumoscan.sqlite3-wal"
    largest = 0
    for index in range(1200):  # ~60 MB written over ~1.5 s
        store.add(_record(index), np.zeros((224, 224), np.uint8))
        time.sleep(0.001)
        largest = max(largest, wal.stat().st_size)
    assert store.checkpoints >= 3
    assert largest < 25 * 1024 * 1024, largest
    store.close()


def _fill_the_disk(store: RecordStore) -> None:
    """Cap the database at its current size: the next write fails as on a full disk
    (SQLITE_FULL, "database or disk is full"), and SQLite rolls the transaction back itself."""
    with store._lock:
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")


def _free_the_disk(store: RecordStore) -> None:
    with store._lock:
        store._db.execute("PRAGMA max_page_count = 1073741823")


def test_a_full_disk_fails_the_write_and_leaves_the_store_usable(tmp_path: Path) -> None:
    """Before, the failed commit's ROLLBACK raised again ("no transaction is active"), hiding
    the real error; a transaction left open would make every later write fail."""
    store = RecordStore(tmp_path, retention_seconds=10)
    store.add(_record(0), np.zeros((224, 224), np.uint8))
    _fill_the_disk(store)
    noise = np.random.default_rng(0).integers(0, 256, (224, 224), dtype=np.uint8)
    with pytest.raises(sqlite3.OperationalError, match="full"):
        store.add(_record(1), noise)
    assert not store._db.in_transaction and store.get(_record(1).id) is None
    _free_the_disk(store)
    store.add(_record(1), noise)
    assert store.get(_record(1).id) is not None
    assert store.purge(now=time.time() + 11) == 2
    assert store.integrity_ok()


def test_a_full_disk_answers_503_storage_unavailable_then_recovers(
    tiny_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No record, no answer: 503 with Retry-After (the server's fault, and a retry succeeds
    once space is freed), said in the log without a traceback; explanations still serve."""
    image = fixture_bytes("originals/person495_bacteria_2094.jpeg")
    with TestClient(
        create_app(make_settings(tiny_store, tmp_path / "data")), headers={"X-API-Key": API_KEY}
    ) as client:
        first = client.post("/predict", files={"file": ("a.jpeg", image)}).json()
        store = client.app.state.services.records
        _fill_the_disk(store)
        refused = client.post("/predict", files={"file": ("a.jpeg", image)})
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "30"
        assert refused.json()["error"]["code"] == "storage_unavailable"
        assert "PNEUMOSCAN_DATA_DIR" in refused.json()["error"]["message"]
        overlay = client.get(first["explain_url"] + "?num_samples=100")  # not stored: disk full
        assert overlay.status_code == 200 and overlay.content[:4] == b"\x89PNG"
        assert 'reason="storage_unavailable"' in client.get("/metrics").text
        assert "pneumoscan_audit_write_failing 1.0" in client.get("/metrics").text
        assert "pneumoscan_ready 0.0" in client.get("/metrics").text
        # Out of rotation until a write works again (before, /readyz stayed 200), but alive.
        for _ in range(2):
            ready = client.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.json()["reason"].startswith("storage_unavailable: audit records")
            assert ready.json()["model"]["version"] == 1
        assert client.get("/healthz").status_code == 200
        _free_the_disk(store)
        # The probe write finds the space without a prediction: a drained instance gets none.
        assert client.get("/readyz").json() == {
            "status": "ready",
            "model": {"name": "pneumonia", "version": 1},
        }
        assert client.post("/predict", files={"file": ("a.jpeg", image)}).status_code == 200
        metrics = client.get("/metrics").text
        assert "pneumoscan_audit_write_failing 0.0" in metrics
        assert "pneumoscan_ready 1.0" in metrics
        assert "pneumoscan_data_dir_free_bytes " in metrics
        assert store.integrity_ok()
        with store._lock:
            assert store._db.execute("SELECT COUNT(*) FROM write_probe").fetchone()[0] == 0
    assert not any(record.exc_info for record in caplog.records)


def test_readiness_fails_below_the_free_space_floor(
    tiny_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A load balancer stops sending images before writes fail; 0 turns the check off. The
    reason is logged once, not on every probe."""
    free_mb = shutil.disk_usage(tmp_path).free // (1024 * 1024)
    for floor, status in ((free_mb + 1024, 503), (0, 200), (1, 200)):
        settings = make_settings(tiny_store, tmp_path / "data", min_free_mb=floor)
        with TestClient(create_app(settings)) as client:
            # The app's logger does not propagate (its own JSON handler): listen on it.
            logging.getLogger("pneumoscan").addHandler(caplog.handler)
            for _ in range(3):
                ready = client.get("/readyz")
                assert ready.status_code == status, ready.text
            metrics = client.get("/metrics").text
            assert f"pneumoscan_ready {1.0 if status == 200 else 0.0}" in metrics
            if status == 503:
                assert ready.json()["reason"].startswith("storage_low: ")
                assert "PNEUMOSCAN_MIN_FREE_MB" in ready.json()["reason"]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("not ready:")]
    assert len(said) == 1 and "storage_low" in said[0], said


def test_log_stays_bounded_with_two_instances_writing(tmp_path: Path) -> None:
    """Two service instances on one data dir (one host: two containers on one volume, or two
    processes) each hold only their own writers off; the other's commits kept every checkpoint
    from finishing, and the log grew with everything written (2.1 GB in 60 s with two uvicorns
    under load; 46-50 MB here before the fix, 4 MB after). The log restart now holds every
    writer off through SQLite's own lock."""
    stores = [
        RecordStore(tmp_path, 3600, checkpoint_interval_s=0.05, wal_restart_pages=256)
        for _ in range(2)
    ]
    wal = tmp_path / "pneumoscan.sqlite3-wal"
    largest = 0
    stop = threading.Event()

    def write(store: RecordStore, first: int) -> None:
        index = first
        while not stop.is_set():
            store.add(_record(index), np.zeros((224, 224), np.uint8))
            index += 2
            time.sleep(0.002)  # about the rate of the single-instance test above

    writers = [
        threading.Thread(target=write, args=(store, first)) for first, store in enumerate(stores)
    ]
    for writer in writers:
        writer.start()
    deadline = time.monotonic() + 60
    while stores[0].count() < 2400 and time.monotonic() < deadline:  # ~120 MB written
        largest = max(largest, wal.stat().st_size)
        time.sleep(0.005)
    stop.set()
    for writer in writers:
        writer.join()
    assert all(store.checkpoints >= 3 for store in stores)
    assert largest < 25 * 1024 * 1024, largest
    assert stores[0].count() >= 2400 and stores[0].integrity_ok()
    for store in stores:
        store.close()


OLD_PREDICTIONS_TABLE = """CREATE TABLE predictions (id TEXT PRIMARY KEY, created REAL NOT
    NULL, key_id TEXT NOT NULL, model_name TEXT NOT NULL, model_version INTEGER NOT NULL,
    p_normal REAL NOT NULL, p_pneumonia REAL NOT NULL, label TEXT NOT NULL, threshold REAL NOT
    NULL, image_sha256 TEXT NOT NULL, input_format TEXT NOT NULL, input_bytes INTEGER NOT NULL,
    width INTEGER NOT NULL, height INTEGER NOT NULL, study_uid TEXT, series_uid TEXT, sop_uid
    TEXT);"""


def test_two_instances_starting_together_on_an_old_database_both_start(tmp_path: Path) -> None:
    """Both read the old table's columns, both added the missing ones, and the second failed
    with "duplicate column name" (8 of 30 tries here before the migration became one write
    transaction)."""
    for attempt in range(10):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        old = sqlite3.connect(folder / "pneumoscan.sqlite3")
        old.executescript(OLD_PREDICTIONS_TABLE)
        old.close()
        barrier, errors = threading.Barrier(2), []

        def start(
            folder: Path = folder, barrier: threading.Barrier = barrier, errors: list = errors
        ) -> None:
            barrier.wait()
            try:
                RecordStore(folder, 3600).close()
            except sqlite3.Error as exc:
                errors.append(exc)

        starting = [threading.Thread(target=start) for _ in range(2)]
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join()
        assert errors == []
        columns = {
            row[1]
            for row in sqlite3.connect(folder / "pneumoscan.sqlite3").execute(
                "PRAGMA table_info(predictions)"
            )
        }
        assert {"ood_score", "age_check"} <= columns


MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 27 0:50 / /srv/pneumo rw,relatime shared:20 - nfs4 nas:/export rw,vers=4.2
41 40 0:51 / /srv/pneumo/local rw,relatime - ext4 /dev/sdb1 rw
42 27 0:52 / /mnt/x\\040ray rw,relatime - cifs //nas/xray rw
43 27 0:53 / /mnt/over rw - nfs nas:/a rw
44 27 0:54 / /mnt/over rw - xfs /dev/sdc1 rw
"""


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/srv/pneumo/data", "nfs4"),
        ("/srv/pneumo", "nfs4"),
        ("/srv/pneumo/local/data", "ext4"),  # a local disk mounted inside the share
        ("/srv/pneumonia", "ext4"),  # a name that only starts like the mount point
        ("/mnt/x ray/data", "cifs"),  # a space, written \040
        ("/mnt/over/data", "xfs"),  # mounted over the share: the last mount is what is seen
        ("/var/lib/pneumoscan", "ext4"),
    ],
)
def test_the_data_dirs_filesystem_is_read_from_mountinfo(
    tmp_path: Path, path: str, kind: str
) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(MOUNTINFO)
    assert records_module.filesystem_type(Path(path), mountinfo) == kind


def test_a_data_dir_on_a_network_filesystem_is_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite's write-ahead log works on one host only, and file locks over NFS or SMB can fail
    and corrupt the database: a share is the usual way to try to scale out, so say so."""
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "27 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        f"40 27 0:50 / {tmp_path.resolve()} rw - nfs4 n:/e rw\n"
    )
    monkeypatch.setattr(records_module, "MOUNTINFO", mountinfo)
    with caplog.at_level(logging.WARNING, logger="pneumoscan.records"):
        RecordStore(tmp_path / "data", 3600).close()
    assert "network filesystem (nfs4)" in caplog.text
    caplog.clear()
    mountinfo.write_text("27 1 8:1 / / rw - ext4 /dev/sda1 rw\n")
    with caplog.at_level(logging.WARNING, logger="pneumoscan.records"):
        RecordStore(tmp_path / "data", 3600).close()
    assert "network filesystem" not in caplog.text


def test_a_database_keeps_its_identity(tmp_path: Path) -> None:
    """The id the reads gauge carries: made once, kept across restarts (and in a backup),
    different for another database."""
    first = RecordStore(tmp_path / "a", 3600)
    made = first.database_id
    first.close()
    again = RecordStore(tmp_path / "a", 3600)
    assert again.database_id == made and re.fullmatch(r"[0-9a-f]{12}", made)
    again.close()
    other = RecordStore(tmp_path / "b", 3600)
    assert other.database_id != made
    other.close()
