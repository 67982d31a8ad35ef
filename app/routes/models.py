"""GET /models: the versions in the store and which one serves."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import KeyIdDep, ServicesDep
from app.schemas import ModelsPublic, VersionInfo, error_responses

router = APIRouter(tags=["models"])


@router.get(
    "/models",
    response_model=ModelsPublic,
    responses=error_responses(401, 403),
    summary="Model versions available and serving",
)
async def list_models(services: ServicesDep, key_id: KeyIdDep) -> ModelsPublic:
    """Every integer version folder, its state, and the serving version's model card."""
    manager = services.manager
    current = manager.current
    versions = []
    for version in manager.available():
        if current is not None and version == current.version:
            versions.append(VersionInfo(version=version, status="serving"))
        elif version in manager.failed:
            versions.append(
                VersionInfo(version=version, status="failed", detail=manager.failed[version])
            )
        else:
            versions.append(VersionInfo(version=version, status="available"))
    card = None
    if current is not None:
        card = {k: v for k, v in current.card.items() if k != "training"}
    return ModelsPublic(
        name=manager.model_dir.name,
        serving=current.version if current else None,
        runtime=current.runtime if current else None,
        pinned=manager.pinned,
        versions=versions,
        card=card,
    )
