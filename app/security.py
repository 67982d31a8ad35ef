"""API keys: constant-time comparison, and a key id (never the key) for logs and records."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

ANONYMOUS = "anonymous"


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key (first 12 hex of its SHA-256)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class KeyRing:
    """The API keys (PNEUMOSCAN_API_KEYS: predict, explain, and see and read their own
    predictions) and the reader keys (PNEUMOSCAN_READER_KEYS: a RIS or reporting system, which
    reports radiologists' reads of, and looks up, predictions made with any API key, and does
    nothing else)."""

    keys: tuple[str, ...]
    allow_anonymous: bool = False
    reader_keys: tuple[str, ...] = ()
    reader_ids: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reader_ids", frozenset(key_id(k) for k in self.reader_keys))

    def identify(self, presented: str | None) -> str | None:
        """Key id for a presented key, or None. Compares every key in constant time."""
        if not self.keys and self.allow_anonymous:
            return ANONYMOUS
        if not presented:
            return None
        match = None
        candidate = presented.encode()
        for key in self.keys + self.reader_keys:
            if hmac.compare_digest(candidate, key.encode()):
                match = key
        return key_id(match) if match else None

    def is_reader(self, identity: str) -> bool:
        return identity in self.reader_ids
