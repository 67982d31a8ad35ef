"""Liveness, readiness and Prometheus metrics (no API key: orchestrators call these)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import ServicesDep
from app.schemas import Health, ModelRef

router = APIRouter(tags=["operations"])


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
    responses={503: {"model": Health, "description": "No model loaded."}},
)
@router.head("/readyz", include_in_schema=False)
async def readyz(services: ServicesDep) -> Response:
    """200 once a verified, warmed-up model version serves; 503 otherwise."""
    model = services.manager.current
    if model is None:
        return JSONResponse(Health(status="not_ready").model_dump(), status_code=503)
    return JSONResponse(
        Health(status="ready", model=ModelRef(name=model.name, version=model.version)).model_dump()
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    """Request counts and latency by route and status, predictions by label, and more."""
    model = services.manager.current
    if model is not None:
        services.metrics.model_version.labels(model.name).set(model.version)
    services.metrics.queue_depth.set(services.batcher.queue.qsize())
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
