"""`pneumoscan backup`: a consistent copy of the audit database while the service writes, with
no stored image (nor any page of one) in it."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from app.backup import backup
from app.cli import main as cli_main
from app.records import PredictionRecord, Reading, RecordStore, StudyRead


def record(index: int) -> PredictionRecord:
    return PredictionRecord(
        f"{index:032x}", time.time(), "key-x", "pneumonia", 1, 0.2, 0.8, "PNEUMONIA", 0.5,
        "0" * 64, "DICOM", 10, 300, 300, study_uid=f"1.2.3.{index}",
    )  # fmt: skip


def test_a_backup_taken_while_predictions_are_written_is_whole_and_holds_no_image(
    tmp_path: Path,
) -> None:
    store = RecordStore(tmp_path / "data", retention_seconds=3600)
    # pixels no other data could hold by chance: if any page of them survived, it would show
    pixels = np.random.default_rng(7).integers(0, 256, (224, 224), dtype=np.uint8)
    for index in range(40):
        store.add(record(index), pixels)
    store.set_readings([Reading(f"{3:032x}", time.time(), "key-r", "NORMAL", 1, "PNEUMONIA")])
    held = StudyRead("1.2.9.9", time.time(), "key-r", "NORMAL", True, time.time() + 86400)
    store.set_study_read(held, [])
    store.add_explanation(f"{3:032x}", 1000, 5, b"PNG" + pixels.tobytes()[:4096])
    stop, written = threading.Event(), [40]

    def keep_writing() -> None:
        while not stop.is_set():
            store.add(record(written[0]), pixels)
            written[0] += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        time.sleep(0.2)
        before = written[0]
        made = backup(tmp_path / "data" / "pneumoscan.sqlite3", tmp_path / "audit.sqlite3")
        after = written[0]
    finally:
        stop.set()
        writer.join()
        store.close()
    copy = tmp_path / "audit.sqlite3"
    assert before <= made["predictions"] <= after + 1  # one snapshot, taken during the writes
    assert made["readings"] == 1 and made["study_reads"] == 1
    assert made["bytes"] == copy.stat().st_size
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    db = sqlite3.connect(copy)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    for table in ("images", "explanations", "write_probe"):
        assert db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0
    ids = [row[0] for row in db.execute("SELECT id FROM predictions ORDER BY id")]
    assert ids == [f"{index:032x}" for index in range(made["predictions"])]  # no gap
    # the same audit trail: restored, it exports its reads under the same database id
    assert db.execute("SELECT value FROM meta WHERE key = 'database_id'").fetchone()[0] == (
        store.database_id
    )
    db.close()
    # rebuilt without the freed pages: the rows alone (about 350 bytes a prediction; the
    # images were 49 KB each)
    assert made["bytes"] < 65536 + made["predictions"] * 4096
    raw = copy.read_bytes()
    for start in range(0, pixels.size, 4096):  # no page of the pixels, not even a freed one
        assert pixels.tobytes()[start : start + 64] not in raw
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".audit")]  # no partial left


def test_a_backup_refuses_to_overwrite_and_says_why_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data"
    assert cli_main(["backup", str(tmp_path / "b.sqlite3"), "--data-dir", str(data)]) == 2
    assert "no audit database" in capsys.readouterr().err
    store = RecordStore(data, retention_seconds=3600)
    store.add(record(1), np.zeros((224, 224), np.uint8))
    store.close()
    target = tmp_path / "b.sqlite3"
    assert cli_main(["backup", str(target), "--data-dir", str(data)]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["predictions"] == 1 and made["backup"] == str(target)
    first = target.read_bytes()
    assert cli_main(["backup", str(target), "--data-dir", str(data)]) == 2
    error = capsys.readouterr().err
    assert "never overwrites" in error and error.count("\n") == 1
    assert target.read_bytes() == first
    missing = tmp_path / "no-such-folder" / "b.sqlite3"
    assert cli_main(["backup", str(missing), "--data-dir", str(data)]) == 2
    assert "is not a directory" in capsys.readouterr().err
    # a copy that cannot be written (here: its temporary name taken) is not made, and
    # nothing of it is left
    blocked = tmp_path / f".c.sqlite3.partial-{os.getpid()}"
    blocked.mkdir()
    assert cli_main(["backup", str(tmp_path / "c.sqlite3"), "--data-dir", str(data)]) == 2
    assert "backup not made" in capsys.readouterr().err
    assert not (tmp_path / "c.sqlite3").exists() and blocked.is_dir()
