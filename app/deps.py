"""Dependencies: the services of this app, and the caller's key id.

They are `async def` on purpose: FastAPI runs plain `def` dependencies on a worker thread, and
two thread hops per request showed up as 13% of the service's CPU under load."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.errors import ForbiddenError, NotFoundError, UnauthorizedError
from app.records import PredictionRecord
from app.services import Services

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="One of the keys in PNEUMOSCAN_API_KEYS."
)
# The same keys as `Authorization: Bearer <key>`, which most HTTP clients, gateways and
# integration engines can send without a custom header. X-API-Key wins where both come.
bearer = HTTPBearer(
    auto_error=False,
    description="One of the keys in PNEUMOSCAN_API_KEYS, as `Authorization: Bearer <key>`.",
)


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def key_id_or_401(services: Services, key: str | None, readers_allowed: bool = False) -> str:
    identity = services.keyring.identify(key)
    if identity is None:
        raise UnauthorizedError(
            "Missing or wrong API key: send one of the keys in PNEUMOSCAN_API_KEYS as the "
            "X-API-Key header or as Authorization: Bearer <key>."
        )
    if not readers_allowed and services.keyring.is_reader(identity):
        raise ForbiddenError(
            "This is a reader key (PNEUMOSCAN_READER_KEYS): it reports radiologists' reads "
            "and looks up predictions; predictions, explanations and the model list take a "
            "key from PNEUMOSCAN_API_KEYS."
        )
    return identity


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


async def get_presented_key(
    key: Annotated[str | None, Security(api_key_header)] = None,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None,
) -> str | None:
    """The key a caller sent: X-API-Key, else Authorization: Bearer."""
    return key or (credentials.credentials if credentials else None)


PresentedKey = Annotated[str | None, Depends(get_presented_key)]


async def get_key_id(services: ServicesDep, key: PresentedKey) -> str:
    return key_id_or_401(services, key)


KeyIdDep = Annotated[str, Depends(get_key_id)]


async def get_reading_key_id(services: ServicesDep, key: PresentedKey) -> str:
    return key_id_or_401(services, key, readers_allowed=True)


# The routes of predictions and reads: an API key, or a reader key (PNEUMOSCAN_READER_KEYS).
ReadingKeyIdDep = Annotated[str, Depends(get_reading_key_id)]

# For the one hot route (POST /predict), which resolves both by hand: FastAPI's dependency
# solving cost ~90 us of event-loop time per request (measured), and the OpenAPI document
# still names the scheme through this.
API_KEY_SECURITY = {"security": [{api_key_header.scheme_name: []}, {bearer.scheme_name: []}]}


def services_and_key_id(request: Request) -> tuple[Services, str]:
    """What ServicesDep and KeyIdDep give, without the dependency solver."""
    services: Services = request.app.state.services
    headers = request.headers
    key = headers.get(api_key_header.model.name) or bearer_token(headers.get("authorization"))
    return services, key_id_or_401(services, key)


# A prediction id: 128 random bits as hex.
ID_PATTERN = r"^[0-9a-f]{32}$"


def may_see(services: Services, key_id: str, record: PredictionRecord) -> bool:
    """A key sees its own predictions; a reader key (a RIS) sees every key's."""
    return record.key_id == key_id or services.keyring.is_reader(key_id)


async def own_record(services: Services, key_id: str, prediction_id: str) -> PredictionRecord:
    """The caller's own prediction (any, for a reader key): another key's is answered like an
    unknown id (404)."""
    record = await asyncio.to_thread(services.records.get, prediction_id)
    if record is None or not may_see(services, key_id, record):
        raise NotFoundError("No prediction with this id for your API key.")
    return record
