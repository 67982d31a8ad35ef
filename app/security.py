"""API keys: constant-time comparison, and a key id (never the key) for logs and records."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

ANONYMOUS = "anonymous"


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key (first 12 hex of its SHA-256)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class KeyRing:
    keys: tuple[str, ...]
    allow_anonymous: bool = False

    def identify(self, presented: str | None) -> str | None:
        """Key id for a presented key, or None. Compares every key in constant time."""
        if not self.keys and self.allow_anonymous:
            return ANONYMOUS
        if not presented:
            return None
        match = None
        candidate = presented.encode()
        for key in self.keys:
            if hmac.compare_digest(candidate, key.encode()):
                match = key
        return key_id(match) if match else None
