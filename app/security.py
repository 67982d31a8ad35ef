"""API keys: constant-time comparison, and a key id (never the key) for logs and records.

Keys come from PNEUMOSCAN_API_KEYS / PNEUMOSCAN_READER_KEYS and from the files named by
PNEUMOSCAN_API_KEYS_FILE / PNEUMOSCAN_READER_KEYS_FILE (Docker or Kubernetes secrets), one per
line, either the key itself or `sha256:<hex>`, its SHA-256, so that the file need not hold the
key. The files are read again when they change (`KeyFileWatcher`), so a key is added or revoked
without a restart."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from app.file_watch import FileWatcher
from app.settings import Settings

ANONYMOUS = "anonymous"
MIN_KEY_LENGTH = 16
_HASHED = re.compile(r"sha256:([0-9a-f]{64})")
log = logging.getLogger("pneumoscan.keys")


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key (first 12 hex of its SHA-256)."""
    return _hash_id(hashlib.sha256(key.encode()).hexdigest())


def _hash_id(digest: str) -> str:
    return "key-" + digest[:12]


@dataclass(frozen=True)
class KeyRing:
    """The API keys (predict, explain, and see and read their own predictions) and the reader
    keys (a RIS or reporting system, which reports radiologists' reads of, and looks up,
    predictions made with any API key, and does nothing else), each as keys or as SHA-256
    digests of keys. A key's id is the same whichever way it was given."""

    keys: tuple[str, ...]
    allow_anonymous: bool = False
    reader_keys: tuple[str, ...] = ()
    hashes: tuple[str, ...] = ()  # hex SHA-256 of API keys
    reader_hashes: tuple[str, ...] = ()
    reader_ids: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        readers = {key_id(k) for k in self.reader_keys} | {_hash_id(h) for h in self.reader_hashes}
        object.__setattr__(self, "reader_ids", frozenset(readers))

    @property
    def counts(self) -> tuple[int, int]:
        """How many API keys and reader keys (for the log: never the keys or their ids)."""
        return len(self.keys) + len(self.hashes), len(self.reader_keys) + len(self.reader_hashes)

    def identify(self, presented: str | None) -> str | None:
        """Key id for a presented key, or None. Compares every key in constant time."""
        if not self.keys and not self.hashes and self.allow_anonymous:
            return ANONYMOUS
        if not presented:
            return None
        match = None
        candidate = presented.encode()
        for key in self.keys + self.reader_keys:
            if hmac.compare_digest(candidate, key.encode()):
                match = key_id(key)
        if self.hashes or self.reader_hashes:
            digest = hashlib.sha256(candidate).hexdigest()
            for known in self.hashes + self.reader_hashes:
                if hmac.compare_digest(digest, known):
                    match = _hash_id(known)
        return match

    def is_reader(self, identity: str) -> bool:
        return identity in self.reader_ids


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file and line, never a key."""


def read_key_file(path: Path, setting: str) -> tuple[list[str], list[str]]:
    """The keys and the SHA-256 digests in a key file: one per line, `#` comments and blank
    lines ignored."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not a key
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise KeyFileError(f"{setting} {path} cannot be read ({reason})") from None
    keys, digests = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        hashed = _HASHED.fullmatch(entry.lower())
        if hashed:
            digests.append(hashed[1])
        elif len(entry) >= MIN_KEY_LENGTH and not any(c.isspace() for c in entry):
            keys.append(entry)
        else:
            raise KeyFileError(
                f"{setting} {path}, line {number}: not a key of {MIN_KEY_LENGTH} or more "
                "characters without spaces, nor sha256:<64 hex digits>"
            )
    return keys, digests


def build_keyring(settings: Settings) -> KeyRing:
    """The keys of the settings and their files (KeyFileError when a file cannot be used, or
    a key is both an API key and a reader key)."""
    keys, hashes = list(settings.key_list), []
    reader_keys, reader_hashes = list(settings.reader_key_list), []
    if settings.api_keys_file is not None:
        found, digests = read_key_file(settings.api_keys_file, "PNEUMOSCAN_API_KEYS_FILE")
        keys += found
        hashes += digests
    if settings.reader_keys_file is not None:
        found, digests = read_key_file(settings.reader_keys_file, "PNEUMOSCAN_READER_KEYS_FILE")
        reader_keys += found
        reader_hashes += digests
    api_ids = {key_id(k) for k in keys} | {_hash_id(h) for h in hashes}
    reader_ids = {key_id(k) for k in reader_keys} | {_hash_id(h) for h in reader_hashes}
    if api_ids & reader_ids:
        raise KeyFileError(
            "a key is both an API key and a reader key (PNEUMOSCAN_READER_KEYS[_FILE]): give "
            "the RIS a key of its own"
        )
    return KeyRing(
        tuple(dict.fromkeys(keys)),
        settings.allow_no_auth,
        tuple(dict.fromkeys(reader_keys)),
        tuple(dict.fromkeys(hashes)),
        tuple(dict.fromkeys(reader_hashes)),
    )


class KeyFileWatcher(FileWatcher):
    """Reads the key files again when they change: every `interval` seconds and at once on
    SIGHUP (`wake`). A file that cannot be used keeps the previous keys in force, and says so
    once in the log and in `failing` (the pneumoscan_key_files_failing gauge)."""

    log = log
    what = "key file"

    def __init__(self, settings: Settings, install, interval: float) -> None:
        super().__init__(interval)
        self.settings = settings
        self.install = install  # called with each new KeyRing
        self.loaded = self.identity()
        self.failing = False
        self._refused: tuple | None = None

    def files(self) -> list[Path]:
        return [p for p in (self.settings.api_keys_file, self.settings.reader_keys_file) if p]

    def check(self) -> bool:
        """Install the files' keys if they changed and can be used; True when installed."""
        current = self.identity()
        if current == self.loaded:
            return False
        try:
            keyring = build_keyring(self.settings)
        except KeyFileError as exc:
            self.failing = True
            if current != self._refused:
                self._refused = current
                log.error("key files not reloaded, the previous keys stay in force: %s", exc)
            return False
        self.install(keyring)
        self.loaded, self._refused, self.failing = current, None, False
        api, readers = keyring.counts
        log.info("key files reloaded: %d API keys, %d reader keys", api, readers)
        if not keyring.keys and not keyring.hashes:
            log.warning("no API key is left: every prediction is refused (401)")
        return True
