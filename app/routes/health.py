"""Liveness, readiness and Prometheus metrics (no API key: orchestrators call these)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import lifecycle, tls
from app.deps import ServicesDep
from app.schemas import Health, ModelRef
from app.services import Services

router = APIRouter(tags=["operations"])
DRAINING = "draining: shutting down (SIGTERM); answering until the listener closes"
log = logging.getLogger("pneumoscan")


# HEAD too (kept out of the OpenAPI schema, where it would repeat GET's operation): some load
# balancers (HAProxy's `option httpchk`, for one) probe with it.
@router.get("/healthz", response_model=Health, summary="The process is alive")
@router.head("/healthz", include_in_schema=False)
async def healthz() -> Health:
    """Always 200 while the process runs."""
    return Health(status="alive")


@router.get(
    "/readyz",
    response_model=Health,
    summary="A model is loaded and answers",
    responses={
        503: {
            "model": Health,
            "description": "No model loaded, audit records cannot be written, or the "
            "service is draining before shutdown.",
        }
    },
)
@router.head("/readyz", include_in_schema=False)
async def readyz(services: ServicesDep) -> Response:
    """200 once a verified, warmed-up model version serves and audit records can be written;
    503 otherwise. Every answer needs its audit record, so an instance whose storage is full or
    failing is taken out of rotation (its liveness stays 200: a restart would not help)."""
    model = services.manager.current
    if model is None:
        return JSONResponse(Health(status="not_ready").model_dump(exclude_none=True), 503)
    ref = ModelRef(name=model.name, version=model.version)
    problem = await serving_problem(services)
    if problem is not None:
        health = Health(status="not_ready", model=ref, reason=problem)
        return JSONResponse(health.model_dump(exclude_none=True), 503)
    return JSONResponse(Health(status="ready", model=ref).model_dump(exclude_none=True))


async def serving_problem(services: Services) -> str | None:
    """Why a loaded model cannot take traffic now (draining, audit storage), or None: the one
    readiness rule, for /readyz and the `pneumoscan_ready` gauge alike."""
    if lifecycle.draining:
        return DRAINING
    return await storage_problem(services)


async def storage_problem(services: Services) -> str | None:
    """Why audit records cannot be written now, or None; a change is logged once, so that an
    operator whose instance never gets ready finds why in the log too."""
    problem = await _storage_problem(services)
    kind = None if problem is None else problem.split(":", 1)[0]
    if kind != services.storage_state:
        if problem is None:
            log.info("audit storage writable again: ready")
        else:
            hint = (
                " (PNEUMOSCAN_MIN_FREE_MB=0 turns this check off)" if kind == "storage_low" else ""
            )
            log.warning("not ready: %s%s", problem, hint)
        services.storage_state = kind
    return problem


async def _storage_problem(services: Services) -> str | None:
    """Free space is read on every call (one statvfs); after a failed write, a probe write
    says when it works again, since a drained instance gets no predictions to find out by."""
    settings = services.settings
    if settings.min_free_mb:
        try:
            free = shutil.disk_usage(settings.data_dir).free
        except OSError as exc:
            return f"storage_unavailable: the data directory cannot be read ({exc.strerror})"
        if free < settings.min_free_mb * 1024 * 1024:
            return (
                f"storage_low: {free // (1024 * 1024)} MB free in PNEUMOSCAN_DATA_DIR, under "
                f"PNEUMOSCAN_MIN_FREE_MB={settings.min_free_mb}"
            )
    if services.writer.failing:
        try:
            await asyncio.to_thread(services.records.probe_write)
        except sqlite3.Error as exc:
            return f"storage_unavailable: audit records cannot be written ({exc})"
        services.writer.failing = False
    return None


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    """Request counts and latency by route and status, predictions by label, and more."""
    model = services.manager.current
    if model is not None:
        services.metrics.model_version.labels(model.name).set(model.version)
    services.metrics.queue_depth.set(services.batcher.queue.qsize())
    # /readyz's answer, for an alert on the scrape (a load balancer's probe leaves no history)
    ready = model is not None and await serving_problem(services) is None
    services.metrics.ready.set(int(ready))
    services.metrics.audit_write_failing.set(int(services.writer.failing))
    try:
        counts = await asyncio.to_thread(services.records.reading_counts)
    except sqlite3.Error:
        counts = None  # unreadable now: the last values stay
    if counts is not None:
        services.metrics.readings.clear()
        database = services.records.database_id
        for version, model_label, reader_label, count in counts:
            series = services.metrics.readings.labels(
                database, str(version), model_label, reader_label
            )
            series.set(count)
    watcher = services.key_watcher
    services.metrics.key_files_failing.set(int(watcher is not None and watcher.failing))
    services.metrics.tls_expiry.clear()
    for role, when in tls.expiry.items():
        services.metrics.tls_expiry.labels(role).set(when)
    services.metrics.tls_crl_next_update.clear()
    if tls.watch.crl_next_update is not None:
        services.metrics.tls_crl_next_update.labels("client").set(tls.watch.crl_next_update)
    services.metrics.tls_files_failing.set(int(tls.watch.reload_failing))
    try:
        services.metrics.data_free_bytes.set(shutil.disk_usage(services.settings.data_dir).free)
    except OSError:
        services.metrics.data_free_bytes.set(float("nan"))
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
