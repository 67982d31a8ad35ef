"""The audit trail: every prediction in an embedded SQLite database (WAL), plus the
preprocessed image kept for explanations until its retention period ends.

A prediction's row and its image are written in one transaction before the response is sent,
so a 200 always has its record, even if the process is killed right after.

Checkpoints (copying the write-ahead log into the database file, with an fsync) run on a thread
of their own, not inside a request's commit: SQLite's default runs one in the commit that takes
the log past 1000 pages, which with a 49 KB image per row was every ~54th prediction, 5-15 ms
each (the one-client p99 of 17 ms in round 11).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import queue
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from app.errors import StorageUnavailableError
from app.idempotency import CLAIM_LAPSE_S, ClaimedElsewhere, ReplayEntry, StoredKey
from app.imaging import TARGET_SIZE
from app.instance_lease import InstanceLease

log = logging.getLogger("pneumoscan.records")

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    key_id TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    p_normal REAL NOT NULL,
    p_pneumonia REAL NOT NULL,
    label TEXT NOT NULL,
    threshold REAL NOT NULL,
    image_sha256 TEXT NOT NULL,
    input_format TEXT NOT NULL,
    input_bytes INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    study_uid TEXT,
    series_uid TEXT,
    sop_uid TEXT,
    ood_score REAL,
    age_check TEXT
);
CREATE INDEX IF NOT EXISTS predictions_study ON predictions(study_uid);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY REFERENCES predictions(id),
    expires REAL NOT NULL,
    pixels BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS images_expires ON images(expires);
CREATE TABLE IF NOT EXISTS write_probe (payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS readings (
    id TEXT PRIMARY KEY REFERENCES predictions(id),
    recorded REAL NOT NULL,
    key_id TEXT NOT NULL,
    reader_label TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    model_label TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS study_reads (
    study_uid TEXT PRIMARY KEY,
    recorded REAL NOT NULL,
    key_id TEXT NOT NULL,
    reader_label TEXT NOT NULL,
    all_keys INTEGER NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS study_reads_expires ON study_reads(expires);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key_id TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    prediction_id TEXT NOT NULL REFERENCES predictions(id),
    expires REAL NOT NULL,
    ood_threshold REAL,
    age_check TEXT,
    PRIMARY KEY (key_id, key_hash)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_expires ON idempotency_keys(expires);
CREATE TABLE IF NOT EXISTS idempotency_claims (
    key_id TEXT NOT NULL,
    key_hash TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    holder TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (key_id, key_hash)
);
CREATE TABLE IF NOT EXISTS explanations (
    id TEXT NOT NULL,
    num_samples INTEGER NOT NULL,
    num_features INTEGER NOT NULL,
    png BLOB NOT NULL,
    PRIMARY KEY (id, num_samples, num_features)
);
"""


@dataclass(frozen=True)
class Reading:
    """A radiologist's read of a scored image, as the caller reported it: with the model's call
    beside it, the site's real-world sensitivity and specificity (`pneumoscan readings`)."""

    id: str
    recorded: float
    key_id: str
    reader_label: str
    model_version: int
    model_label: str


@dataclass(frozen=True)
class StudyRead:
    """A radiologist's read of a whole study, as a RIS reports it (PUT /studies/{uid}/reading).
    Besides the images of the study already scored, it is held until `expires` for those scored
    later (an outage's backlog, an image sent after the report), and recorded for each as it is
    scored: the images of `key_id` only, or of every key (`all_keys`: a reader key's)."""

    study_uid: str
    recorded: float
    key_id: str
    reader_label: str
    all_keys: bool
    expires: float


# Reads held at most (about 150 bytes each): beyond, a read for a study with no scored image is
# refused rather than held, so that a caller cannot grow the database without bound. How long a
# read waits is PNEUMOSCAN_STUDY_READ_HOLD_DAYS, and this bound PNEUMOSCAN_MAX_STUDY_READS.
MAX_STUDY_READS = 100_000


@dataclass(frozen=True)
class PredictionRecord:
    id: str
    created: float
    key_id: str
    model_name: str
    model_version: int
    p_normal: float
    p_pneumonia: float
    label: str
    threshold: float
    image_sha256: str
    input_format: str
    input_bytes: int
    width: int
    height: int
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    ood_score: float | None = None  # null when the model version has no such score
    age_check: str | None = None  # within / outside / unknown (app.population); null: check off


RAW_SIZE = TARGET_SIZE * TARGET_SIZE
STUDY_LIMIT = 500  # predictions of one study read or listed at once (the latest)

# The background checkpointer's period, and the log size (pages of 4 KB, ~170 predictions) past
# which it also holds the writers off briefly to finish the copy, so that the next commit can
# start the log from the beginning again: under sustained load, commits keep landing during
# every unlocked checkpoint and the log would otherwise grow without bound.
CHECKPOINT_INTERVAL_S = 1.0
WAL_RESTART_PAGES = 2048
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024  # what a restarted log is truncated back to
RESTART_WAIT_S = 0.25


def encode_pixels(pixels: np.ndarray) -> bytes:
    """The 224 x 224 uint8 model input as raw bytes: PNG-compressing it cost a quarter of the
    service's CPU under load (profiled), and 49 KB per stored image is cheap."""
    if pixels.shape != (TARGET_SIZE, TARGET_SIZE) or pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 (224, 224), got {pixels.dtype} {pixels.shape}")
    return pixels.tobytes()


def decode_pixels(data: bytes) -> np.ndarray:
    if len(data) == RAW_SIZE:
        return np.frombuffer(data, dtype=np.uint8).reshape(TARGET_SIZE, TARGET_SIZE).copy()
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))  # rows written as PNG


def audit_database(data_dir: Path) -> Path:
    """The audit database in the service's PNEUMOSCAN_DATA_DIR."""
    return data_dir / "pneumoscan.sqlite3"


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    """--data-dir, for the commands that read the audit database beside a running service."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="the service's PNEUMOSCAN_DATA_DIR (default: that setting)",
    )


def audit_database_of(args: argparse.Namespace) -> Path:
    """The audit database the --data-dir argument names, or PNEUMOSCAN_DATA_DIR's."""
    data_dir = args.data_dir
    if data_dir is None:
        from app.settings import Settings

        data_dir = Settings().data_dir
    return audit_database(data_dir)


def log_reading(
    prediction_id: str,
    key_id: str,
    model_version: int,
    label: str,
    reader_label: str,
) -> None:
    """One read recorded, by prediction id (never the study's or the image's identifiers),
    on the pneumoscan.readings logger wherever it was recorded."""
    logging.getLogger("pneumoscan.readings").info(
        "reading",
        extra={
            "prediction_id": prediction_id,
            "key_id": key_id,
            "model_version": model_version,
            "label": label,
            "reader_label": reader_label,
        },
    )


# Filesystems whose files other hosts can open: SQLite's write-ahead log keeps its index in
# shared memory (one host only), and their locks are unreliable (SQLite's own documentation).
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "fuse.glusterfs",
        "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "afs", "lustre", "9p",
    }
)  # fmt: skip
MOUNTINFO = Path("/proc/self/mountinfo")


def filesystem_type(path: Path, mountinfo: Path | None = None) -> str | None:
    """The type of the filesystem `path` is on, from the longest mount point holding it (the
    last of those mounted over one another); None where /proc/self/mountinfo cannot be read
    (not Linux)."""
    try:
        lines = (mountinfo or MOUNTINFO).read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, kind = -1, None
    for line in lines:
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        separator = fields.index("-", 6)
        # spaces and backslashes in mount points are written as octal escapes (\040)
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best and separator + 1 < len(fields):
            best, kind = len(point), fields[separator + 1]
    return kind


def warn_if_shared_over_a_network(data_dir: Path) -> None:
    kind = filesystem_type(data_dir)
    if kind in NETWORK_FILESYSTEMS:
        log.warning(
            "PNEUMOSCAN_DATA_DIR is on a network filesystem (%s). The audit database (SQLite, "
            "write-ahead log) must only ever be opened from one host, and file locks over %s "
            "can fail and corrupt it: use a local disk or a block volume. Several instances "
            "may share one data dir on one host only (README: Several instances).",
            kind,
            kind,
        )


def use_write_ahead_log(db: sqlite3.Connection, patience_s: float = 10.0) -> None:
    """Switch the database to WAL mode (kept in the file; a no-op once done). The switch
    needs the database to itself, and SQLite refuses it at once ("database is locked", without
    waiting out the busy timeout) while another connection is making the same switch: two
    instances starting together on one data dir, with a database not yet in WAL mode."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class RecordStore:
    def __init__(
        self,
        data_dir: Path,
        retention_seconds: float,
        checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
        wal_restart_pages: int = WAL_RESTART_PAGES,
        max_study_reads: int = MAX_STUDY_READS,
    ) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        warn_if_shared_over_a_network(data_dir)
        self.path = audit_database(data_dir)
        self.retention = retention_seconds
        self.max_study_reads = max_study_reads
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        use_write_ahead_log(self._db)
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives process kills
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer thread does them
        self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
        self._db.executescript(SCHEMA)
        self._migrate()
        self.lease = InstanceLease(data_dir)
        self.checkpoint_interval = checkpoint_interval_s
        self.wal_restart_pages = wal_restart_pages
        self.checkpoints = 0  # completed background checkpoints (for tests and diagnosis)
        self._written = threading.Event()
        self._closing = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="records-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        """After writes, wait one interval (later writes join the same checkpoint), then
        checkpoint on a connection of this thread's own."""
        # A restart waits at most this long for another instance's commit or a reader (a
        # backup), with this instance's writers held off; if it cannot finish, the next round
        # tries again.
        db = sqlite3.connect(self.path, isolation_level=None, timeout=RESTART_WAIT_S)
        try:
            while not self._closing.is_set():
                self._written.wait()
                if self._closing.wait(self.checkpoint_interval):
                    return
                self._written.clear()
                try:
                    self.checkpoint(db)
                except sqlite3.Error as exc:  # the next round tries again; commits still work
                    log.warning("audit database checkpoint failed: %s", exc)
        finally:
            db.close()

    def checkpoint(self, db: sqlite3.Connection) -> None:
        """Copy the write-ahead log into the database beside the writers (`db`: a connection
        other than the writers'). If the log had grown past `wal_restart_pages`, finish the
        copy with the writers held off, so that the next commit starts the log from the
        beginning: only the pages committed meanwhile are left (a few ms). SQLite's RESTART
        mode holds them off with the database's own write lock, so the writers of another
        instance on the same data dir wait too (the process's lock held only this one's, and
        two instances' commits kept the log growing without bound); this one's wait on the
        process lock instead of polling SQLite's."""
        _, pages, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if pages >= self.wal_restart_pages:
            with self._lock:
                db.execute("PRAGMA wal_checkpoint(RESTART)")
        self.checkpoints += 1

    def _migrate(self) -> None:
        """Columns added after a database was created (SQLite adds them as NULL for old rows).
        Read and added in one write transaction: two instances starting together on an old
        database would otherwise both add a column, and the second fail to start."""
        with self._transaction():
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(predictions)")}
            if "ood_score" not in columns:
                self._db.execute("ALTER TABLE predictions ADD COLUMN ood_score REAL")
            if "age_check" not in columns:
                self._db.execute("ALTER TABLE predictions ADD COLUMN age_check TEXT")
            # The database's identity, made once: instances sharing it export the same reads,
            # and alerting rules count them once per database (`max by (database, ...)`).
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('database_id', ?)", (secrets.token_hex(6),)
            )
            (self.database_id,) = self._db.execute(
                "SELECT value FROM meta WHERE key = 'database_id'"
            ).fetchone()

    def close(self) -> None:
        self._closing.set()
        self._written.set()
        self._checkpointer.join(timeout=10)
        with self._lock:
            self._db.close()  # the last connection to close checkpoints and removes the log
        self.lease.close()

    def add(
        self, record: PredictionRecord, pixels: np.ndarray, replay: ReplayEntry | None = None
    ) -> None:
        self.add_many([(record, pixels, replay)])

    def add_many(
        self, items: list[tuple[PredictionRecord, np.ndarray, ReplayEntry | None]]
    ) -> None:
        """Write predictions, their images and their Idempotency-Keys in one transaction (all
        or none). A key another instance sharing the database wrote first is kept: its first
        prediction is the one replayed."""
        fields = list(PredictionRecord.__dataclass_fields__)
        insert = (
            f"INSERT INTO predictions ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})"
        )
        rows = [[getattr(record, f) for f in fields] for record, _, _ in items]
        images = [
            (record.id, record.created + self.retention, encode_pixels(pixels))
            for record, pixels, _ in items
        ]
        keys = [
            (
                record.key_id,
                e.key_hash,
                record.image_sha256,
                record.id,
                e.expires,
                e.ood_threshold,
                e.age_check,
            )
            for record, _, e in items
            if e is not None
        ]
        in_studies = [(record.id,) for record, _, _ in items if record.study_uid is not None]
        applied: list[tuple] = []
        with self._lock, self._transaction():
            self._db.executemany(insert, rows)
            self._db.executemany(
                "INSERT INTO images (id, expires, pixels) VALUES (?, ?, ?)", images
            )
            if keys:
                self._db.executemany(
                    "INSERT OR IGNORE INTO idempotency_keys VALUES (?, ?, ?, ?, ?, ?, ?)", keys
                )
                self._db.executemany(
                    "DELETE FROM idempotency_claims WHERE key_id = ? AND key_hash = ?",
                    [key[:2] for key in keys],
                )
            if in_studies:
                applied = self._apply_study_reads(in_studies)
        self._written.set()
        for row in applied:
            log_reading(*row)

    def _apply_study_reads(self, prediction_ids: list[tuple[str]]) -> list[tuple]:
        """Record a held study read for each of these predictions (new ones, or unread ones of
        a study whose read is being recorded) that its key may see, unless a prediction of the
        same image (SOP instance) and model version has a read already: an image sent twice
        counts once. In the caller's transaction; the reads of these predictions afterwards."""
        now = time.time()
        self._db.executemany(
            """INSERT OR IGNORE INTO readings
                (id, recorded, key_id, reader_label, model_version, model_label)
            SELECT p.id, s.recorded, s.key_id, s.reader_label, p.model_version, p.label
            FROM predictions p JOIN study_reads s ON s.study_uid = p.study_uid
            WHERE p.id = ? AND s.expires > ? AND (s.all_keys = 1 OR s.key_id = p.key_id)
              AND NOT EXISTS (
                SELECT 1 FROM predictions q JOIN readings r ON r.id = q.id
                WHERE q.study_uid = p.study_uid AND q.sop_uid IS p.sop_uid
                  AND q.model_version = p.model_version AND q.id != p.id)""",
            [(prediction_id, now) for (prediction_id,) in prediction_ids],
        )
        ids = [prediction_id for (prediction_id,) in prediction_ids]
        return self._db.execute(
            "SELECT id, key_id, model_version, model_label, reader_label FROM readings "
            f"WHERE id IN ({', '.join('?' * len(ids))})",
            ids,
        ).fetchall()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error. SQLite has already rolled back
        a transaction whose commit failed for a full disk (SQLITE_FULL), so the rollback is only
        issued while one is still open: a second error would hide the first, and a transaction
        left open would make every later BEGIN fail."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def probe_write(self) -> None:
        """Commit, then delete, a blob twice the size of a stored image: raises sqlite3.Error
        where a prediction's write would fail now (full, read-only or failing storage). Twice:
        with room for exactly one image, the probe passed and the next write failed (measured
        with `benchmarks.full_disk`)."""
        with self._lock, self._transaction():
            self._db.execute("INSERT INTO write_probe VALUES (?)", (bytes(2 * RAW_SIZE),))
            self._db.execute("DELETE FROM write_probe")

    def get(self, prediction_id: str) -> PredictionRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(PredictionRecord.__dataclass_fields__)} FROM predictions "
                "WHERE id = ?",
                (prediction_id,),
            ).fetchone()
        return PredictionRecord(*row) if row else None

    def idempotency_key(
        self, key_id: str, key_hash: str, now: float | None = None
    ) -> StoredKey | None:
        """The unexpired use of this Idempotency-Key (its SHA-256) by this API key, if any."""
        now = time.time() if now is None else now
        with self._lock:
            return self._stored_key(key_id, key_hash, now)

    def _stored_key(self, key_id: str, key_hash: str, now: float) -> StoredKey | None:
        row = self._db.execute(
            "SELECT image_sha256, prediction_id, expires, ood_threshold, age_check "
            "FROM idempotency_keys WHERE key_id = ? AND key_hash = ? AND expires > ?",
            (key_id, key_hash, now),
        ).fetchone()
        if row is None:
            return None
        image_sha256, prediction_id, expires, ood_threshold, age_check = row
        return StoredKey(
            image_sha256, prediction_id, ReplayEntry(key_hash, expires, ood_threshold, age_check)
        )

    def claim_idempotency_key(
        self,
        key_id: str,
        key_hash: str,
        image_sha256: str,
        now: float | None = None,
        lapse_s: float = CLAIM_LAPSE_S,
    ) -> StoredKey | ClaimedElsewhere | None:
        """Claim a key for this instance to score its first request, in one transaction with
        the lookup, so that of several instances sharing the database only one scores it:
        the key's recorded use if it has one (answer it again), the claim of another running
        instance (wait for it), or None: claimed, until the prediction's own transaction
        deletes the claim (`add_many`) or `release_idempotency_claim`. A claim whose holder is
        no longer running (killed) or has lapsed is taken over; one held by this instance is
        stale (the caller holds the key in-process, app.idempotency.KeysInFlight)."""
        now = time.time() if now is None else now
        with self._lock, self._transaction():
            used = self._stored_key(key_id, key_hash, now)
            if used is not None:
                return used
            claim = self._db.execute(
                "SELECT image_sha256, holder, until FROM idempotency_claims "
                "WHERE key_id = ? AND key_hash = ?",
                (key_id, key_hash),
            ).fetchone()
            if claim is not None:
                claimed_image, holder, until = claim
                if until > now and holder != self.lease.id and self.lease.is_running(holder):
                    return ClaimedElsewhere(claimed_image)
            self._db.execute(
                "INSERT OR REPLACE INTO idempotency_claims VALUES (?, ?, ?, ?, ?)",
                (key_id, key_hash, image_sha256, self.lease.id, now + lapse_s),
            )
        return None

    def release_idempotency_claim(self, key_id: str, key_hash: str) -> None:
        """Give up this instance's claim on a key whose request ended without a prediction."""
        with self._lock, self._transaction():
            self._db.execute(
                "DELETE FROM idempotency_claims WHERE key_id = ? AND key_hash = ? AND holder = ?",
                (key_id, key_hash, self.lease.id),
            )

    def image(self, prediction_id: str, now: float | None = None) -> np.ndarray | None:
        now = time.time() if now is None else now
        with self._lock:
            row = self._db.execute(
                "SELECT pixels FROM images WHERE id = ? AND expires > ?", (prediction_id, now)
            ).fetchone()
        return decode_pixels(row[0]) if row else None

    def explanation(self, prediction_id: str, num_samples: int, num_features: int) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT png FROM explanations WHERE id = ? AND num_samples = ? AND "
                "num_features = ?",
                (prediction_id, num_samples, num_features),
            ).fetchone()
        return row[0] if row else None

    def add_explanation(
        self, prediction_id: str, num_samples: int, num_features: int, png: bytes
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO explanations VALUES (?, ?, ?, ?)",
                (prediction_id, num_samples, num_features, png),
            )
        self._written.set()

    def set_reading(self, reading: Reading) -> None:
        """Record (or correct: the last one counts) the read of one prediction."""
        self.set_readings([reading])

    def set_readings(self, readings: list[Reading]) -> None:
        """set_reading for several predictions, in one transaction (all or none)."""
        fields = list(Reading.__dataclass_fields__)
        with self._lock, self._transaction():
            self._db.executemany(
                f"INSERT OR REPLACE INTO readings ({', '.join(fields)}) "
                f"VALUES ({', '.join('?' * len(fields))})",
                [[getattr(reading, f) for f in fields] for reading in readings],
            )
        self._written.set()

    def set_study_read(self, study_read: StudyRead, readings: list[Reading]) -> list[tuple]:
        """Hold a study's read (replacing an earlier one: a corrected report) and record it for
        the images already scored, in one transaction. A prediction of the study committed
        after the caller looked the study up (and before this transaction) gets the held read
        here, as it would have at its own commit had the read come first; those are returned
        (as _apply_study_reads). ValueError, with nothing written, when the study has no such
        image and `max_study_reads` reads are held already."""
        fields = list(Reading.__dataclass_fields__)
        with self._lock, self._transaction():
            if not readings:
                held = self._db.execute(
                    "SELECT COUNT(*) FROM study_reads WHERE study_uid != ?",
                    (study_read.study_uid,),
                ).fetchone()[0]
                if held >= self.max_study_reads:
                    raise ValueError(f"{held} study reads are held already")
            self._db.execute(
                "INSERT OR REPLACE INTO study_reads VALUES (?, ?, ?, ?, ?, ?)",
                (
                    study_read.study_uid,
                    study_read.recorded,
                    study_read.key_id,
                    study_read.reader_label,
                    int(study_read.all_keys),
                    study_read.expires,
                ),
            )
            self._db.executemany(
                f"INSERT OR REPLACE INTO readings ({', '.join(fields)}) "
                f"VALUES ({', '.join('?' * len(fields))})",
                [[getattr(reading, f) for f in fields] for reading in readings],
            )
            unread = self._db.execute(
                "SELECT p.id FROM predictions p WHERE p.study_uid = ? AND NOT EXISTS "
                "(SELECT 1 FROM readings r WHERE r.id = p.id) ORDER BY p.created DESC LIMIT ?",
                (study_read.study_uid, STUDY_LIMIT),
            ).fetchall()
            applied = self._apply_study_reads(unread) if unread else []
        self._written.set()
        return applied

    def by_study(self, study_uid: str, limit: int = STUDY_LIMIT) -> list[PredictionRecord]:
        """The predictions of one study (DICOM inputs with that Study Instance UID), oldest
        first: the latest `limit` of them (a study holds a few images; a caller that sends
        one study's UID with thousands of uploads must not make one answer unbounded)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(PredictionRecord.__dataclass_fields__)} FROM predictions "
                "WHERE study_uid = ? ORDER BY created DESC LIMIT ?",
                (study_uid, limit),
            ).fetchall()
        return [PredictionRecord(*row) for row in reversed(rows)]

    def reading(self, prediction_id: str) -> Reading | None:
        return self.readings([prediction_id]).get(prediction_id)

    def readings(self, prediction_ids: list[str]) -> dict[str, Reading]:
        """The reads of several predictions, by id, in one query (those without one left out)."""
        if not prediction_ids:
            return {}
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(Reading.__dataclass_fields__)} FROM readings "
                f"WHERE id IN ({', '.join('?' * len(prediction_ids))})",
                prediction_ids,
            ).fetchall()
        return {row[0]: Reading(*row) for row in rows}

    def reading_counts(self, since: float = 0.0) -> list[tuple[int, str, str, int]]:
        with self._lock:
            return count_readings(self._db, since)

    def purge(self, now: float | None = None) -> int:
        """Delete stored images and explanations past retention, and study reads past their
        hold; the audit rows and the reads recorded stay."""
        now = time.time() if now is None else now
        with self._lock, self._transaction():
            self._db.execute(
                "DELETE FROM explanations WHERE id IN (SELECT id FROM images WHERE expires <= ?)",
                (now,),
            )
            deleted = self._db.execute("DELETE FROM images WHERE expires <= ?", (now,)).rowcount
            # a study's read stops waiting for its images; those it reached keep their reads
            self._db.execute("DELETE FROM study_reads WHERE expires <= ?", (now,))
            # a key past its window makes a new prediction: nothing needs its row
            self._db.execute("DELETE FROM idempotency_keys WHERE expires <= ?", (now,))
            self._db.execute("DELETE FROM idempotency_claims WHERE until <= ?", (now,))
        self._written.set()
        return deleted

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])

    def integrity_ok(self) -> bool:
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def latest_reads(db: sqlite3.Connection, split: str = "NULL") -> str:
    """SQL for the reads reported since `?`, one per image and model version: an image sent
    twice (a PACS re-send) and read on both of its predictions (a RIS reporting by prediction
    id for every entry of GET /studies/{uid}/predictions) counts once, by its latest read.
    An image is its SOP Instance UID, or the prediction itself for a JPEG or PNG. Columns:
    model_version, model_label, reader_label, split (the `split` expression, over `p`, the
    prediction)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(predictions)")}
    image = "COALESCE(p.sop_uid, p.id)" if "sop_uid" in columns else "p.id"
    return (
        "SELECT model_version, model_label, reader_label, split FROM ("
        f"SELECT r.model_version, r.model_label, r.reader_label, {split} AS split, "
        f"ROW_NUMBER() OVER (PARTITION BY {image}, r.model_version "
        "ORDER BY r.recorded DESC, r.rowid DESC) AS newest "
        "FROM readings r JOIN predictions p ON p.id = r.id WHERE r.recorded >= ?) "
        "WHERE newest = 1"
    )


def count_readings(db: sqlite3.Connection, since: float = 0.0) -> list[tuple[int, str, str, int]]:
    """(model version, model label, reader label, count) of the images read since (latest_reads:
    one read per image and model version)."""
    rows = db.execute(
        f"SELECT model_version, model_label, reader_label, COUNT(*) FROM ({latest_reads(db)}) "
        "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        (since,),
    ).fetchall()
    return [(int(v), str(m), str(r), int(n)) for v, m, r, n in rows]


class RecordWriter:
    """One thread writes the audit trail; requests that arrive together share a transaction
    (group commit), so a burst costs one commit instead of one per request and no request
    thread waits on the database lock. `add` returns only once the row is committed."""

    def __init__(self, store: RecordStore, max_group: int = 64) -> None:
        self.store = store
        self.max_group = max_group
        # The last group's write failed: readiness reports it until a write succeeds.
        self.failing = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="records-writer", daemon=True)
        self._thread.start()

    async def add(
        self, record: PredictionRecord, pixels: np.ndarray, replay: ReplayEntry | None = None
    ) -> None:
        """Returns once the record is committed; StorageUnavailableError if it cannot be."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((record, pixels, replay, loop, future))
        try:
            await future
        except sqlite3.Error as exc:
            raise StorageUnavailableError(
                f"The audit record could not be written ({exc}), so no result is given for "
                "this image: free space in the service's data directory (PNEUMOSCAN_DATA_DIR) "
                "or retry later."
            ) from exc

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            group = [item]
            stop = False
            while len(group) < self.max_group:
                try:
                    following = self._queue.get_nowait()
                except queue.Empty:
                    break
                if following is None:
                    stop = True
                    break
                group.append(following)
            error: BaseException | None = None
            try:
                self.store.add_many([item[:3] for item in group])
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                log.error("audit records not written, %d request(s) refused: %s", len(group), exc)
                error = exc
            self.failing = error is not None
            for *_, loop, future in group:
                loop.call_soon_threadsafe(_settle, future, error)
            if stop:
                return


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
