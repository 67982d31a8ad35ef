"""GET /predictions/{id}: a prediction as the audit trail holds it; PUT .../reading: the
radiologist's read of the same image, so the site can measure the model against its own
readers (`pneumoscan readings`, and `pneumoscan_readings` in /metrics). Both only for the key
that made the prediction, as /explain."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Request
from pydantic import ValidationError

from app.deps import ID_PATTERN, KeyIdDep, ServicesDep, own_record
from app.errors import InvalidBodyError, StorageUnavailableError
from app.records import Reading
from app.routes.predict import read_body
from app.schemas import (
    DicomInfo,
    InputInfo,
    ModelRef,
    PredictionStored,
    Probabilities,
    ReadingIn,
    ReadingPublic,
    error_responses,
)

log = logging.getLogger("pneumoscan.readings")
router = APIRouter(tags=["predictions"])
# A reading is a few bytes of JSON: its body is read by the bounded reader of uploads
# (FastAPI would read a body of any size before validating it), never more than this.
MAX_READING_BYTES = 4096
PredictionId = Annotated[str, Path(pattern=ID_PATTERN)]


def reading_public(reading: Reading, model_name: str) -> ReadingPublic:
    return ReadingPublic(
        prediction_id=reading.id,
        reader_label=reading.reader_label,
        model_label=reading.model_label,
        agrees=reading.reader_label == reading.model_label,
        model=ModelRef(name=model_name, version=reading.model_version),
        recorded=datetime.fromtimestamp(reading.recorded, UTC),
    )


@router.get(
    "/predictions/{prediction_id}",
    response_model=PredictionStored,
    responses=error_responses(401, 404, descriptions={422: "Not a prediction id."}),
    summary="A prediction as the audit trail holds it",
)
async def get_prediction(
    request: Request, services: ServicesDep, key_id: KeyIdDep, prediction_id: PredictionId
) -> PredictionStored:
    """The call, its probabilities and model version, the input's size and SHA-256, DICOM
    UIDs, and the radiologist's read once reported; never the image."""
    record = await own_record(services, key_id, prediction_id)
    reading = await asyncio.to_thread(services.records.reading, prediction_id)
    uids = (record.study_uid, record.series_uid, record.sop_uid)
    return PredictionStored(
        prediction_id=record.id,
        created=datetime.fromtimestamp(record.created, UTC),
        label=record.label,
        probabilities=Probabilities(NORMAL=record.p_normal, PNEUMONIA=record.p_pneumonia),
        threshold=record.threshold,
        model=ModelRef(name=record.model_name, version=record.model_version),
        explain_url=f"{request.scope.get('root_path', '')}/explain/{record.id}",
        input=InputInfo(
            format=record.input_format,
            width=record.width,
            height=record.height,
            bytes=record.input_bytes,
            sha256=record.image_sha256,
        ),
        dicom=DicomInfo(
            study_instance_uid=uids[0], series_instance_uid=uids[1], sop_instance_uid=uids[2]
        )
        if any(uids)
        else None,
        ood_score=record.ood_score,
        age_check=record.age_check,
        reading=None if reading is None else reading_public(reading, record.model_name),
    )


@router.put(
    "/predictions/{prediction_id}/reading",
    response_model=ReadingPublic,
    responses=error_responses(
        401,
        404,
        413,
        503,
        descriptions={422: 'The body is not {"label": "NORMAL"} or {"label": "PNEUMONIA"}.'},
    ),
    summary="Report the radiologist's read of the image",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ReadingIn.model_json_schema()}},
        }
    },
)
async def put_reading(
    request: Request, services: ServicesDep, key_id: KeyIdDep, prediction_id: PredictionId
) -> ReadingPublic:
    """Idempotent: a corrected read replaces the earlier one. Counted per model version and
    pair of labels in `/metrics` (`pneumoscan_readings`) and by `pneumoscan readings`, which
    turns them into the sensitivity and specificity the model reaches on this site's images,
    as its readers read them."""
    settings = services.settings
    with services.upload_budget.hold() as holding:
        body = await read_body(request, MAX_READING_BYTES, settings.upload_timeout_s, holding)
    try:
        reading_in = ReadingIn.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidBodyError(
            'Send a JSON body {"label": "NORMAL"} or {"label": "PNEUMONIA"}: '
            + "; ".join(error["msg"] for error in exc.errors()[:3])
        ) from None
    record = await own_record(services, key_id, prediction_id)
    reading = Reading(
        id=record.id,
        recorded=time.time(),
        key_id=key_id,
        reader_label=reading_in.label,
        model_version=record.model_version,
        model_label=record.label,
    )
    try:
        await asyncio.to_thread(services.records.set_reading, reading)
    except sqlite3.Error as exc:
        raise StorageUnavailableError(
            f"The reading could not be recorded ({exc}); retry once PNEUMOSCAN_DATA_DIR has "
            "space again."
        ) from None
    log.info(
        "reading",
        extra={
            "prediction_id": record.id,
            "key_id": key_id,
            "model_version": record.model_version,
            "label": record.label,
            "reader_label": reading.reader_label,
        },
    )
    return reading_public(reading, record.model_name)
