"""Assembles the app: settings, lifespan (model, batcher, records), routers, error mapping.

Run with `uvicorn app.main:app` or `pneumoscan serve`; tests build apps with `create_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import lifecycle
from app.admission import KeyConcurrency, UploadBudget
from app.batching import MicroBatcher
from app.classifier import ModelManager
from app.errors import OverloadedError, PneumoscanError, UnauthorizedError
from app.idempotency import IDEMPOTENCY_HEADER, REPLAYED_HEADER
from app.observability import Metrics, ObservabilityMiddleware, configure_logging
from app.population import AGE_HEADER
from app.records import RecordStore, RecordWriter
from app.routes import explain, health, models, predict, predictions
from app.schemas import INTENDED_USE
from app.security import KeyFileError, KeyFileWatcher, KeyRing, build_keyring
from app.services import Services
from app.settings import Settings

log = logging.getLogger("pneumoscan")
PURGE_INTERVAL_S = 60.0

DESCRIPTION = f"""
Chest radiograph pneumonia screening: JPEG, PNG or DICOM in, calibrated NORMAL / PNEUMONIA
probabilities and a LIME explanation overlay out.

**{INTENDED_USE}**

Every route except `/healthz`, `/readyz` and `/metrics` needs an `X-API-Key` header. Errors are
JSON: `{{"error": {{"code": ..., "message": ...}}}}`.
"""


def error_json(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PneumoscanError)
    async def domain_error(request: Request, exc: PneumoscanError) -> JSONResponse:
        headers = None
        if isinstance(exc, OverloadedError):
            headers = {"Retry-After": str(exc.retry_after)}
        elif isinstance(exc, UnauthorizedError):  # RFC 9110: a 401 names its scheme
            headers = {"WWW-Authenticate": 'Bearer realm="pneumoscan"'}
        return error_json(exc.status_code, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return error_json(422, "invalid_request", fields or "Invalid request.")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_json(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        return error_json(
            500,
            "internal_error",
            "Internal error; the request id is in the X-Request-ID header for the operator.",
        )


def build_services(settings: Settings, metrics: Metrics, keyring: KeyRing) -> Services:
    records = RecordStore(
        settings.data_dir,
        settings.retention_hours * 3600,
        max_study_reads=settings.max_study_reads,
    )
    manager = ModelManager(
        settings.model_store,
        settings.model_name,
        settings.model_version,
        settings.poll_seconds,
        settings.model_runtime,
        settings.model_threads,
    )
    return Services(
        settings=settings,
        metrics=metrics,
        keyring=keyring,
        manager=manager,
        batcher=MicroBatcher(
            manager,
            settings.batch_max_size,
            settings.batch_max_wait_ms,
            settings.queue_max,
            settings.instances,
        ),
        records=records,
        writer=RecordWriter(records),
        decode_pool=ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode"),
        explain_pool=ThreadPoolExecutor(settings.explain_workers, thread_name_prefix="explain"),
        explain_model_pool=ThreadPoolExecutor(
            settings.instances, thread_name_prefix="explain-model"
        ),
        decode_slots=asyncio.Semaphore(settings.queue_max),
        upload_budget=UploadBudget(settings.max_inflight_upload_bytes),
        key_slots=KeyConcurrency(settings.max_inflight_per_key),
        explain_slots=asyncio.Semaphore(settings.explain_workers + settings.explain_queue_max),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build an app; nothing heavy happens until its lifespan starts."""
    settings = settings or Settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        current = settings
        configure_logging(current.log_level)
        try:
            keyring = build_keyring(current)
        except KeyFileError as exc:
            log.critical("refusing to start: %s", exc)
            raise RuntimeError(str(exc)) from None
        if not keyring.keys and not keyring.hashes:
            if not current.allow_no_auth:
                log.critical(
                    "refusing to start: PNEUMOSCAN_API_KEYS (and PNEUMOSCAN_API_KEYS_FILE) "
                    "hold no key. Set keys, or PNEUMOSCAN_ALLOW_NO_AUTH=true for local "
                    "development only."
                )
                raise RuntimeError(
                    "PNEUMOSCAN_API_KEYS is empty and PNEUMOSCAN_ALLOW_NO_AUTH is not set"
                )
            log.warning(
                "AUTHENTICATION IS OFF (PNEUMOSCAN_ALLOW_NO_AUTH=true): development "
                "only, never on a hospital network"
            )
        threads = current.model_threads  # applied by each runtime as it loads a version
        services = build_services(current, metrics, keyring)
        app.state.services = services
        watching = None
        if (current.api_keys_file or current.reader_keys_file) and current.keys_reload_seconds:
            # a key added to or revoked from the files takes effect without a restart
            services.key_watcher = KeyFileWatcher(
                current,
                lambda new: setattr(services, "keyring", new),
                current.keys_reload_seconds,
            )
            watching = asyncio.create_task(services.key_watcher.run(), name="key-files")
            lifecycle.reload_listeners.append(services.key_watcher.wake)
        await asyncio.to_thread(services.manager.refresh)
        services.manager.start_polling()
        services.batcher.start()
        purger = asyncio.create_task(purge_loop(services), name="retention-purge")
        log.info(
            "pneumoscan started: model store %s, serving %s (%s), %d model instances x %s threads",
            current.model_store.name,
            services.manager.current.version if services.manager.current else "nothing",
            services.manager.current.runtime if services.manager.current else "-",
            current.instances,
            threads or "default",
        )
        try:
            yield
        finally:
            purger.cancel()
            if watching is not None:
                watching.cancel()
                lifecycle.reload_listeners.remove(services.key_watcher.wake)
            await services.batcher.stop()
            services.manager.stop()
            services.decode_pool.shutdown(wait=False, cancel_futures=True)
            services.explain_pool.shutdown(wait=False, cancel_futures=True)
            services.explain_model_pool.shutdown(wait=False, cancel_futures=True)
            services.writer.close()
            services.records.close()

    app = FastAPI(
        title="pneumoscan",
        version="0.1.0",
        summary="Chest X-ray pneumonia screening assistance (not a diagnosis).",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    origins = settings.cors_list
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PUT"],
            allow_headers=[
                "X-API-Key",
                "Authorization",
                "Content-Type",
                AGE_HEADER,
                IDEMPOTENCY_HEADER,
            ],
            # what a browser client reads besides the body: a replay, when to retry, the SR's id
            expose_headers=[REPLAYED_HEADER, "Retry-After", "X-Prediction-Id"],
        )
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    install_error_handlers(app)
    for module in (predict, explain, predictions, models, health):
        app.include_router(module.router)
    return app


async def purge_loop(services: Services) -> None:
    while True:
        try:
            deleted = await asyncio.to_thread(services.records.purge)
            if deleted:
                log.info("retention purge removed %d stored images", deleted)
        except sqlite3.Error as exc:  # a full or failing disk: said once per round, retried
            log.warning("retention purge failed: %s", exc)
        except Exception:
            log.exception("retention purge failed")
        await asyncio.sleep(PURGE_INTERVAL_S)


app = create_app()
