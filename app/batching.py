"""Micro-batching: concurrent predictions are gathered into one model call.

Requests wait at most `max_wait` for company, batches hold at most `max_size` images, and the
queue is bounded: when it is full the caller gets 503 with Retry-After instead of the process
growing memory. The model runs off the event loop on `instances` dedicated threads (TensorFlow
Serving's and Triton's "model instances"): while one batch is in the model, the next one is
gathered and can start on another core.

A lone request (nothing else queued, decoding or in the model) is scored on the event loop's
own thread instead, without the two thread hand-offs around the call: the loop is busy for one
1-3 ms model call, which is what the lone request waits for anyway (one-client p50 about 4 %
lower in alternating pairs; README, round 12). Only while the last one-image call took at most
`INLINE_MAX_MS`: a slow model (a bigger one, or a starved CPU) must not stall the loop, and with
it health checks and the uploads that would have formed the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from app.classifier import LoadedModel, ModelManager
from app.errors import OverloadedError

log = logging.getLogger("pneumoscan.batching")

INLINE_MAX_MS = 5.0  # a one-image call slower than this is never run on the event loop


@dataclass
class BatchResult:
    probabilities: np.ndarray  # (2,)
    model: LoadedModel
    queue_ms: float
    inference_ms: float
    batch_size: int
    ood_score: float | None = None


@dataclass
class _Item:
    pixels: np.ndarray
    future: asyncio.Future
    enqueued: float


class MicroBatcher:
    def __init__(
        self,
        manager: ModelManager,
        max_size: int,
        max_wait_ms: float,
        queue_max: int,
        instances: int = 1,
    ) -> None:
        self.manager = manager
        self.max_size = max_size
        self.max_wait = max_wait_ms / 1000.0
        self.instances = instances
        self.queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=queue_max)
        self.executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix="inference")
        self._tasks: list[asyncio.Task] = []
        # Requests between upload and queue (decoding). The gather wait only makes sense when
        # more are on their way: a lone request goes straight to the model.
        self.incoming = 0
        self.in_model = 0  # batches on the instance threads now
        # The last one-image model call's duration; None until one was measured (off the loop).
        self.lone_ms: float | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run(), name=f"micro-batcher-{index}")
            for index in range(self.instances)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(OverloadedError("The service is shutting down.", 5))
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def predict(self, pixels: np.ndarray) -> BatchResult:
        self.manager.get()  # fail fast with 503 when no model is loaded
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Item(pixels, future, time.perf_counter()))
        except asyncio.QueueFull:
            raise OverloadedError(
                f"The prediction queue is full ({self.queue.maxsize} waiting); retry shortly.",
                retry_after=1,
            ) from None
        return await future

    def idle(self) -> bool:
        """No request waits in the queue or is being decoded for it."""
        return self.incoming == 0 and self.queue.empty()

    def inline(self, size: int) -> bool:
        """Score this batch on the event loop: one image, nothing else about, a fast model."""
        return (
            size == 1
            and self.in_model == 0
            and self.idle()
            and self.lone_ms is not None
            and self.lone_ms <= INLINE_MAX_MS
        )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            items = [first]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_size:
                if not self.queue.empty():
                    items.append(self.queue.get_nowait())
                    continue
                if self.incoming == 0:
                    break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            items = [item for item in items if not item.future.cancelled()]
            if not items:
                continue
            try:
                model = self.manager.get()
                batch = np.stack([item.pixels for item in items])[..., None]
                started = time.perf_counter()
                if self.inline(len(items)):
                    probs, ood = model.score(batch)
                else:
                    self.in_model += 1
                    try:
                        probs, ood = await loop.run_in_executor(self.executor, model.score, batch)
                    finally:
                        self.in_model -= 1
                inference_ms = (time.perf_counter() - started) * 1000
                if len(items) == 1:
                    self.lone_ms = inference_ms
            except Exception as exc:  # noqa: BLE001 - hand any failure to the waiting requests
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            for index, (item, row) in enumerate(zip(items, probs, strict=True)):
                if not item.future.done():
                    item.future.set_result(
                        BatchResult(
                            row,
                            model,
                            (started - item.enqueued) * 1000,
                            inference_ms,
                            len(items),
                            None if ood is None else float(ood[index]),
                        )
                    )
