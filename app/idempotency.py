"""`Idempotency-Key` on POST /predict (draft-ietf-httpapi-idempotency-key-header).

A gateway that loses an answer (a timeout, a connection reset by a restart or a certificate
change) cannot know whether its image was scored; sent again, it would be scored twice, and the
audit trail, the reads report and the PACS would hold two predictions of one image. With the
same key on the retry, the service answers the first prediction again instead
(`Idempotent-Replayed: true`), in whichever representation the retry asks for, for
PNEUMOSCAN_IDEMPOTENCY_HOURS. The key is scoped to the API key that sent it, and bound to the
uploaded file's SHA-256: the same key with another image is refused (422), and a retry that
arrives while the first is still being scored is told to wait (409, Retry-After).

Only the key's SHA-256 is stored: a RIS may well put an accession number in it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from app.errors import OverloadedError, PneumoscanError
from app.schemas import AgeCheck

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
KEY_CHARACTERS = frozenset(chr(c) for c in range(0x21, 0x7F)) - {'"', "\\"}
# A claim on a key (app.records) by an instance that still runs lapses after this long: a
# request held longer than this (it has its upload and decode behind it) is taken for lost.
CLAIM_LAPSE_S = 60.0


class InvalidIdempotencyKeyError(PneumoscanError):
    status_code = 422
    code = "invalid_idempotency_key"


class IdempotencyKeyReusedError(PneumoscanError):
    """The key was used for another image: a client bug, never a retry."""

    status_code = 422
    code = "idempotency_key_reused"


class IdempotencyKeyInUseError(OverloadedError):
    """The first request with this key is still being scored, in this instance or another one
    sharing the database (409 with Retry-After)."""

    status_code = 409
    code = "idempotency_key_in_use"

    def __init__(self) -> None:
        super().__init__(
            f"A request with this {IDEMPOTENCY_HEADER} is still being scored; retry shortly "
            "for its answer.",
            1,
        )


def idempotency_key(values: list[str]) -> str | None:
    """The key of the request's Idempotency-Key header, None without one. The draft writes it
    as a Structured Field string ("..."); a bare token, as most APIs take it, works too. 422
    for one that is empty, too long, not visible ASCII, or sent twice (the message never
    quotes it)."""
    if not values:
        return None
    if len(values) > 1:
        raise InvalidIdempotencyKeyError(
            f"Send {IDEMPOTENCY_HEADER} once (it came {len(values)} times)."
        )
    value = values[0].strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not value or len(value) > MAX_KEY_LENGTH or not all(c in KEY_CHARACTERS for c in value):
        raise InvalidIdempotencyKeyError(
            f"{IDEMPOTENCY_HEADER} must be 1 to {MAX_KEY_LENGTH} visible ASCII characters, "
            'without spaces, quotes or backslashes, such as a UUID (quoted, "...", or bare).'
        )
    return value


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class ReplayEntry:
    """What an answer needs beyond the prediction's record to be given again exactly: the
    out-of-distribution threshold and age check of the model version that made it."""

    key_hash: str
    expires: float
    ood_threshold: float | None
    age_check: str | None  # AgeCheck as JSON, or None with the check off

    @classmethod
    def of(
        cls, key_hash: str, expires: float, ood_threshold: float | None, age: AgeCheck | None
    ) -> ReplayEntry:
        return cls(key_hash, expires, ood_threshold, None if age is None else age.model_dump_json())

    def age(self) -> AgeCheck | None:
        return None if self.age_check is None else AgeCheck(**json.loads(self.age_check))


@dataclass(frozen=True)
class StoredKey:
    """An unexpired key's row: the image it was used for and the prediction it made."""

    image_sha256: str
    prediction_id: str
    entry: ReplayEntry


@dataclass(frozen=True)
class ClaimedElsewhere:
    """Another running instance sharing the database is scoring the first request with this
    key (its image's SHA-256), so this one must not score it too."""

    image_sha256: str


class KeysInFlight:
    """The (API key id, key hash) pairs whose first request is being scored in this process.
    Requests run on one event loop, so a set is enough."""

    def __init__(self) -> None:
        self._held: set[tuple[str, str]] = set()

    def claim(self, key_id: str, key_hash: str) -> None:
        if (key_id, key_hash) in self._held:
            raise IdempotencyKeyInUseError()
        self._held.add((key_id, key_hash))

    def release(self, key_id: str, key_hash: str) -> None:
        self._held.discard((key_id, key_hash))
