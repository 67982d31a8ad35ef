"""`pneumoscan backup DEST`: a consistent copy of the audit database, taken while the service
runs, without the images.

The audit trail (every prediction, the radiologists' reads, the study reads held) is the
record a hospital keeps. Copying `pneumoscan.sqlite3` with `cp` while the service writes can
give a torn copy (the database is in WAL mode: recent commits live in `-wal` until a
checkpoint). SQLite's online backup copies one consistent snapshot, under a read transaction
that does not stop the service's writers.

The stored images (the 224 x 224 preprocessed radiographs) and their overlays are kept only for
PNEUMOSCAN_RETENTION_HOURS, so a backup must not keep them longer: they are deleted from the
copy and the copy is rebuilt (VACUUM), so that no page of pixel data survives in its free space.
The copy is written beside the destination under a temporary name, readable by this user only,
checked (`PRAGMA integrity_check`) and renamed into place; an existing destination is never
overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from contextlib import closing
from pathlib import Path

from app.records import add_data_dir_argument, audit_database_of

# Tables dropped from a backup: pixel data past its retention, and the service's write probe.
TRANSIENT_TABLES = ("images", "explanations", "write_probe")
KEPT_TABLES = ("predictions", "readings", "study_reads")


class BackupError(Exception):
    """A backup that cannot be made, said in one line."""


def backup(database: Path, destination: Path) -> dict:
    """Copy `database` to `destination` without its images; the copy's row counts."""
    started = time.perf_counter()
    if not database.is_file():
        raise BackupError(f"no audit database at {database}")
    if destination.exists():
        raise BackupError(f"{destination} exists; a backup never overwrites, choose a new name")
    if not destination.parent.is_dir():
        raise BackupError(f"{destination.parent} is not a directory")
    partial = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
    created = False
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        created = True
        with (
            closing(sqlite3.connect(database, timeout=30)) as source,
            closing(sqlite3.connect(partial, isolation_level=None)) as copy,
        ):
            source.backup(copy)  # one step: one snapshot
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            copy.execute("PRAGMA secure_delete=ON")  # deleted rows zeroed, whatever the build
            copy.execute("BEGIN")
            for table in TRANSIENT_TABLES:
                copy.execute(f"DELETE FROM {table}")
            copy.execute("COMMIT")
            copy.execute("VACUUM")  # no deleted pixel page left in the file
            checked = copy.execute("PRAGMA integrity_check").fetchone()[0]
            if checked != "ok":
                raise BackupError(f"the copy failed its integrity check: {checked}")
            counts = {
                table: copy.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                for table in KEPT_TABLES
            }
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        os.rename(partial, destination)
        directory = os.open(destination.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except (OSError, sqlite3.Error) as exc:
        raise BackupError(f"backup not made: {exc}") from None
    finally:
        if created:
            partial.unlink(missing_ok=True)  # gone already once renamed
    return {
        "backup": str(destination),
        "bytes": destination.stat().st_size,
        **counts,
        "seconds": round(time.perf_counter() - started, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pneumoscan backup",
        description="A consistent copy of the audit database (predictions, reads, study reads "
        "held), taken while the service runs, without the stored images (JSON on stdout). "
        "Restore: stop the service, put the copy in PNEUMOSCAN_DATA_DIR as pneumoscan.sqlite3.",
    )
    parser.add_argument("destination", type=Path, help="the backup file to write (new)")
    add_data_dir_argument(parser)
    args = parser.parse_args(argv)
    try:
        made = backup(audit_database_of(args), args.destination)
    except BackupError as exc:
        print(f"pneumoscan backup: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(made, indent=2))
    return 0
