"""Admission by memory: how many bytes of uploads the service holds at once.

Every `/predict` keeps its upload in memory from the first byte read to its answer (the decode,
the audit hash and, for DICOM, the SR built from the parsed dataset need it). Without a bound,
a burst of large studies (24 clients posting 21 MB DICOMs took the process from 0.8 to 1.5 GB,
2.0 GB before the DICOM decode used a lookup table) or a hostile client could grow the process
until the kernel or a container limit kills it, taking every in-flight answer with it.

A request that would pass the budget is answered 503 `overloaded` with `Retry-After` instead:
before its body is read when its declared length does not fit, otherwise as soon as the bytes
that arrived pass it. Only bytes received are held, so a slow client that declares a large body
pins nothing it has not sent. Used from the event loop only, so it needs no lock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from app.errors import OverloadedError, TooManyRequestsError


class UploadBudget:
    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.held = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[UploadHolding]:
        """One request's share; everything it took is given back when the request ends."""
        holding = UploadHolding(self)
        try:
            yield holding
        finally:
            self.held -= holding.bytes
            holding.bytes = 0


class UploadHolding:
    def __init__(self, budget: UploadBudget) -> None:
        self.budget = budget
        self.bytes = 0

    def check(self, n: int) -> None:
        """Refuse the request (503) now if `n` more bytes would not fit, without holding them:
        a declared length is checked up front but counted only as the bytes arrive, so a
        client that declares a large body and sends nothing pins no budget."""
        if self.budget.held + n > self.budget.limit:
            raise OverloadedError(
                "Too many large uploads are in flight; retry shortly "
                f"(limit {self.budget.limit} bytes held at once).",
                retry_after=2,
            )

    def take(self, n: int) -> None:
        """Count `n` more bytes of this upload, or refuse the request (503) if the service
        already holds as much as it may."""
        if n <= 0:
            return
        self.check(n)
        self.budget.held += n
        self.bytes += n


class KeyConcurrency:
    """How many predictions each API key has in flight, from the first byte of its upload to its
    answer. With a limit, a key at it is answered 429 `too_many_requests` with Retry-After
    before its body is read: a site replaying a day's backlog as fast as it can then gets
    back-pressure, while another site's (the emergency department's) images still find room in
    the shared queues. Used from the event loop only, so it needs no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no per-key limit
        self.inflight: dict[str, int] = {}

    def acquire(self, key_id: str) -> None:
        """Take one of the key's slots, or raise TooManyRequestsError; `release` gives it back."""
        count = self.inflight.get(key_id, 0)
        if self.limit and count >= self.limit:
            raise TooManyRequestsError(
                f"This API key already has {count} predictions in flight, the most "
                "PNEUMOSCAN_MAX_INFLIGHT_PER_KEY allows: wait for an answer before sending more."
            )
        self.inflight[key_id] = count + 1

    def release(self, key_id: str) -> None:
        left = self.inflight[key_id] - 1
        if left:
            self.inflight[key_id] = left
        else:
            del self.inflight[key_id]  # keys come and go: the table holds only busy ones
