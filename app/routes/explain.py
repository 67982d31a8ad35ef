"""GET /explain/{prediction_id}: the LIME overlay PNG, computed once and cached."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from app.deps import ID_PATTERN, KeyIdDep, ServicesDep, own_record
from app.errors import (
    GoneError,
    ModelStoreError,
    ModelVersionGoneError,
    OverloadedError,
)
from app.explain import SOURCE_LONG_SIDE, explain, overlay_png, to_source_shape
from app.records import PredictionRecord
from app.schemas import error_responses

log = logging.getLogger("pneumoscan.explain")
router = APIRouter(tags=["explain"])


@router.get(
    "/explain/{prediction_id}",
    name="explain",
    summary="LIME explanation overlay for a prediction",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "The overlay PNG."},
        **error_responses(401, 403, 404, 409, 410, 422, 503),
    },
)
async def get_explanation(
    services: ServicesDep,
    key_id: KeyIdDep,
    prediction_id: Annotated[str, Path(pattern=ID_PATTERN)],
    num_samples: Annotated[
        int | None, Query(ge=100, le=5000, description="LIME perturbation samples.")
    ] = None,
    num_features: Annotated[int | None, Query(ge=1, le=20, description="Regions drawn.")] = None,
    shape: Annotated[
        Literal["model", "source"],
        Query(
            description="`model`: the 224 x 224 model input, as the model saw it. `source`: "
            "the same overlay at the uploaded image's aspect ratio, long side "
            f"{SOURCE_LONG_SIDE} px, so the anatomy has its proportions (for a viewer)."
        ),
    ] = "model",
) -> Response:
    """The radiograph with the regions that drove the call tinted and outlined."""
    settings = services.settings
    num_samples = num_samples or settings.explain_num_samples
    num_features = num_features or settings.explain_num_features
    record = await own_record(services, key_id, prediction_id)
    cache_key = (prediction_id, num_samples, num_features)
    headers = {"X-Prediction-Label": record.label, "X-Model-Version": str(record.model_version)}
    png = services.cache_get(cache_key)
    if png is None:
        png = await asyncio.to_thread(services.records.explanation, *cache_key)
    if png is not None:
        services.cache_put(cache_key, png)
        return png_response(png, record, shape, {**headers, "X-Cache": "hit"})
    pixels = await asyncio.to_thread(services.records.image, prediction_id)
    if pixels is None:
        raise GoneError(
            f"The stored image is past its {settings.retention_hours:g} h retention period."
        )

    async def draw() -> bytes:
        async with services.explain_slots:
            # Drawn by the version that made the call, even after a switch: another version's
            # regions would not explain this prediction.
            try:
                model = await asyncio.to_thread(services.manager.version, record.model_version)
            except ModelStoreError as exc:
                log.warning("cannot explain with model version %d: %s", record.model_version, exc)
                raise ModelVersionGoneError(
                    f"The prediction was made by model version {record.model_version}, which "
                    "is no longer in the model store; no other version's overlay would explain it."
                ) from None
            started = time.perf_counter()

            def run() -> bytes:
                mask, _ = explain(
                    pixels,
                    model.predict,
                    model.class_names,
                    record.label,
                    num_samples,
                    num_features,
                    pool=services.explain_model_pool,
                )
                return overlay_png(pixels, mask, record.label)

            png = await asyncio.get_running_loop().run_in_executor(services.explain_pool, run)
            services.metrics.explain_seconds.observe(time.perf_counter() - started)
        try:
            await asyncio.to_thread(services.records.add_explanation, *cache_key, png)
        except sqlite3.Error as exc:  # the overlay is still good; only its stored copy is lost
            log.warning("explanation not stored (%s); served from memory only", exc)
        services.cache_put(cache_key, png)
        return png

    # One computation per explanation: a second request for the same overlay (a double click,
    # a viewer's prefetch) waits for the first instead of running LIME again, and the result
    # is stored even if the client that started it goes away.
    task = services.explain_inflight.get(cache_key)
    if task is None:
        if services.explain_slots.locked():
            services.metrics.rejected.labels("explain_queue_full").inc()
            raise OverloadedError("Too many explanations are queued; retry shortly.", 5)
        task = asyncio.get_running_loop().create_task(draw())
        services.explain_inflight[cache_key] = task
        task.add_done_callback(lambda done: _forget(services.explain_inflight, cache_key, done))
    png = await asyncio.shield(task)
    return png_response(png, record, shape, {**headers, "X-Cache": "miss"})


def png_response(
    png: bytes, record: PredictionRecord, shape: str, headers: dict[str, str]
) -> Response:
    if shape == "source":
        png = to_source_shape(png, record.width, record.height)
    return Response(png, media_type="image/png", headers=headers)


def _forget(inflight: dict, key: tuple, task: asyncio.Task) -> None:
    """Drop a finished computation; mark its error as seen even if every waiter left."""
    inflight.pop(key, None)
    if not task.cancelled():
        task.exception()
