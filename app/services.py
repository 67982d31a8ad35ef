"""The long-lived objects one app instance owns, built in the lifespan and reached through
dependencies (`app.deps`; POST /predict reads them from `app.state` directly, see there)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from app.admission import KeyConcurrency, UploadBudget
from app.batching import MicroBatcher
from app.classifier import ModelManager
from app.idempotency import KeysInFlight
from app.observability import Metrics
from app.records import RecordStore, RecordWriter
from app.security import KeyFileWatcher, KeyRing
from app.settings import Settings


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    keyring: KeyRing
    manager: ModelManager
    batcher: MicroBatcher
    records: RecordStore
    writer: RecordWriter
    decode_pool: ThreadPoolExecutor
    explain_pool: ThreadPoolExecutor
    explain_model_pool: ThreadPoolExecutor  # one LIME batch per model instance
    decode_slots: asyncio.Semaphore
    upload_budget: UploadBudget
    key_slots: KeyConcurrency
    explain_slots: asyncio.Semaphore
    explain_cache: OrderedDict[tuple[str, int, int], bytes] = field(default_factory=OrderedDict)
    explain_cache_max: int = 64
    # Explanations being computed, by cache key: concurrent requests for one share the work.
    explain_inflight: dict[tuple[str, int, int], asyncio.Task] = field(default_factory=dict)
    # What /readyz last found wrong with the audit storage ("storage_low", ...), or None.
    storage_state: str | None = None
    key_watcher: KeyFileWatcher | None = None  # with PNEUMOSCAN_*_KEYS_FILE
    # Idempotency-Keys whose first request is being scored (409 for a retry meanwhile).
    idempotency_in_flight: KeysInFlight = field(default_factory=KeysInFlight)

    def cache_get(self, key: tuple[str, int, int]) -> bytes | None:
        png = self.explain_cache.get(key)
        if png is not None:
            self.explain_cache.move_to_end(key)
        return png

    def cache_put(self, key: tuple[str, int, int], png: bytes) -> None:
        self.explain_cache[key] = png
        while len(self.explain_cache) > self.explain_cache_max:
            self.explain_cache.popitem(last=False)
