"""Which of the service instances sharing a data dir are running, for the claims they hold.

An instance that claims an Idempotency-Key in the audit database (app.records) and is then
killed leaves its claim behind. Each instance therefore holds an exclusive flock(2) on a file
of its own under `<data dir>/instances/` for as long as its process lives. The kernel drops the
lock when the process ends in any way, `kill -9` included, and it holds across processes and
containers on one host that share the volume (one kernel). So a claim whose holder's lock is
free belongs to an instance that is gone, and a retry may take it over at once instead of
waiting for the claim to lapse. (SQLite itself needs the same host: app.records warns about a
data dir on a network file system.)"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("pneumoscan.instances")

INSTANCE_ID = re.compile(r"[0-9a-f]{16}")


class InstanceLease:
    """This instance's lock file, held until `close` or the process's end."""

    def __init__(self, data_dir: Path) -> None:
        self.folder = data_dir / "instances"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.id = secrets.token_hex(8)
        # Locked under a temporary name, then renamed into place: another instance's sweep
        # never sees the file unlocked, so never takes it for a dead instance's and deletes it.
        pending = self.folder / f".{self.id}.pending"
        self.path = self.folder / f"{self.id}.lock"
        self._file: BinaryIO | None = open(pending, "wb")  # held while this instance runs
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:  # a file system without flock (some network shares)
            self._file.close()
            self._file = None
            pending.unlink(missing_ok=True)
            log.warning(
                "no file locks in the data dir (%s): an Idempotency-Key claimed by an instance "
                "that is killed stays claimed until the claim lapses",
                type(exc).__name__,
            )
            return
        os.replace(pending, self.path)
        self._sweep()

    def is_running(self, instance_id: str) -> bool:
        """Whether the instance that wrote this id still runs (this one does). An id that is
        not one, or a lock file that is gone, is an instance that is not running; a lock
        file that cannot be opened counts as running (its claims then lapse by time)."""
        if instance_id == self.id or self._file is None:  # without locks, no instance can tell
            return True
        if not INSTANCE_ID.fullmatch(instance_id):
            return False
        try:
            with open(self.folder / f"{instance_id}.lock", "rb") as lock_file:
                try:
                    fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                return False  # closing the file drops the lock just taken
        except FileNotFoundError:
            return False
        except OSError:
            return True

    def _sweep(self) -> None:
        """Delete the lock files of instances that are no longer running."""
        for path in self.folder.glob("*.lock"):
            if not self.is_running(path.stem):
                path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._file is None:
            return
        self.path.unlink(missing_ok=True)
        self._file.close()
        self._file = None
