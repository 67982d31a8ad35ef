"""Files a running service takes up again when they change (TLS certificates, key files):
checked every `interval` seconds and at once on SIGHUP (`wake`), by their identity (inode,
size, modification time), so an in-place edit and a rename over the file both count."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path


def identity(paths: list[Path]) -> tuple:
    """What changes when any of `paths` is replaced or rewritten (None for a missing one)."""
    found = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            found.append(None)
            continue
        found.append((info.st_ino, info.st_size, info.st_mtime_ns))
    return tuple(found)


class FileWatcher:
    """The loop; a subclass says which files (`files`) and what a change means (`check`)."""

    log: logging.Logger
    what = "file"  # for the log line of an unexpected failure

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._wake = asyncio.Event()

    def files(self) -> list[Path]:
        raise NotImplementedError

    def check(self) -> bool:
        raise NotImplementedError

    def changed(self) -> None:
        """Runs on the event loop after a check that took up a change (returned True)."""

    def identity(self) -> tuple:
        return identity(self.files())

    def wake(self) -> None:
        """SIGHUP: check now."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                if await asyncio.to_thread(self.check):
                    self.changed()
            except Exception:  # the watcher must outlive any surprise; the log says where
                self.log.exception("%s check failed", self.what)
