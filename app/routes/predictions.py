"""GET /predictions/{id}: a prediction as the audit trail holds it; PUT .../reading: the
radiologist's read of the same image, so the site can measure the model against its own
readers (`pneumoscan readings`, and `pneumoscan_readings` in /metrics); PUT
/studies/{uid}/reading: the read of a whole study, as a RIS knows it (by its Study Instance UID,
not by prediction ids), and GET /studies/{uid}/predictions, what it shows beside the study.
For the key that made the prediction, as /explain, or a reader key (PNEUMOSCAN_READER_KEYS:
the RIS), which sees every key's predictions."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from pydantic import ValidationError

from app.deps import ID_PATTERN, ReadingKeyIdDep, ServicesDep, may_see, own_record
from app.errors import InvalidBodyError, NotFoundError, StorageUnavailableError
from app.records import (
    PredictionRecord,
    Reading,
    StudyRead,
    log_reading,
)
from app.routes.predict import read_body
from app.schemas import (
    ModelRef,
    PredictionStored,
    ReadingIn,
    ReadingPublic,
    StudyPredictions,
    StudyReadingPublic,
    error_responses,
)

log = logging.getLogger("pneumoscan.readings")
router = APIRouter(tags=["predictions"])
# A reading is a few bytes of JSON: its body is read by the bounded reader of uploads
# (FastAPI would read a body of any size before validating it), never more than this.
MAX_READING_BYTES = 4096
PredictionId = Annotated[str, Path(pattern=ID_PATTERN)]
# A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters.
StudyUid = Annotated[str, Path(pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)]
READING_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ReadingIn.model_json_schema()}},
    }
}


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
    request: Request, services: ServicesDep, key_id: ReadingKeyIdDep, prediction_id: PredictionId
) -> PredictionStored:
    """The call, its probabilities and model version, the input's size and SHA-256, DICOM
    UIDs, and the radiologist's read once reported; never the image."""
    record = await own_record(services, key_id, prediction_id)
    reading = await asyncio.to_thread(services.records.reading, prediction_id)
    return stored(request, record, reading, services.keyring.is_reader(key_id))


@router.get(
    "/studies/{study_instance_uid}/predictions",
    response_model=StudyPredictions,
    responses=error_responses(
        401,
        404,
        descriptions={
            404: "No scored image of this study (for this key, unless a reader key).",
            422: "The path is not a DICOM UID.",
        },
    ),
    summary="The predictions of one study, as the audit trail holds them",
)
async def get_study_predictions(
    request: Request, services: ServicesDep, key_id: ReadingKeyIdDep, study_instance_uid: StudyUid
) -> StudyPredictions:
    """What a RIS or reporting system shows beside the study while the radiologist reports:
    every prediction of the study (oldest first), each as GET /predictions/{id} gives it, with
    the read once reported. A reader key (PNEUMOSCAN_READER_KEYS) sees every key's, an API key
    its own."""
    visible = await study_records(services, key_id, study_instance_uid)
    readings = await asyncio.to_thread(services.records.readings, [r.id for r in visible])
    reader = services.keyring.is_reader(key_id)
    return StudyPredictions(
        study_instance_uid=study_instance_uid,
        predictions=[
            stored(request, record, readings.get(record.id), reader) for record in visible
        ],
    )


async def study_records(
    services: ServicesDep, key_id: str, study_instance_uid: str
) -> list[PredictionRecord]:
    """The study's predictions this key may see (every key's, for a reader key), oldest first;
    404 when there are none."""
    found = await asyncio.to_thread(services.records.by_study, study_instance_uid)
    visible = [record for record in found if may_see(services, key_id, record)]
    if not visible:
        raise NotFoundError("No prediction of this study for your API key.")
    return visible


def stored(
    request: Request, record: PredictionRecord, reading: Reading | None, reader: bool
) -> PredictionStored:
    """The record as answered; without `explain_url` for a reader key (403 on /explain)."""
    explain_url = None if reader else f"{request.scope.get('root_path', '')}/explain/{record.id}"
    return PredictionStored(
        **PredictionStored.fields_of(record, explain_url),
        created=datetime.fromtimestamp(record.created, UTC),
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
    openapi_extra=READING_BODY,
)
async def put_reading(
    request: Request, services: ServicesDep, key_id: ReadingKeyIdDep, prediction_id: PredictionId
) -> ReadingPublic:
    """Idempotent: a corrected read replaces the earlier one. Counted per model version and
    pair of labels in `/metrics` (`pneumoscan_readings`) and by `pneumoscan readings`, which
    turns them into the sensitivity and specificity the model reaches on this site's images,
    as its readers read them."""
    reading_in = await read_reading(request, services)
    record = await own_record(services, key_id, prediction_id)
    (reading,) = await record_readings(services, key_id, reading_in, [record])
    return reading_public(reading, record.model_name)


@router.put(
    "/studies/{study_instance_uid}/reading",
    response_model=StudyReadingPublic,
    responses={
        202: {
            "model": StudyReadingPublic,
            "description": "No image of the study is scored yet: the read is held and recorded "
            "for its images as they are scored (readings empty).",
        },
        **error_responses(
            401,
            404,
            413,
            503,
            descriptions={
                404: "No scored image of this study, and too many reads are held already to "
                "hold this one: retry later.",
                422: 'The body is not {"label": "NORMAL"} or {"label": "PNEUMONIA"}, or the '
                "path is not a DICOM UID.",
            },
        ),
    },
    summary="Report the radiologist's read of a whole study",
    openapi_extra=READING_BODY,
)
async def put_study_reading(
    request: Request,
    response: Response,
    services: ServicesDep,
    key_id: ReadingKeyIdDep,
    study_instance_uid: StudyUid,
) -> StudyReadingPublic:
    """What a RIS knows when the report is signed: the study and its finding, not the
    prediction ids the PACS gateway got. The read is recorded for each scored image of the
    study (a PA and a repeat PA both get it; the latest prediction per SOP instance and model
    version, so an image sent twice counts once), with the same rules as the read of one
    prediction: a corrected read replaces the earlier one. A reader key
    (PNEUMOSCAN_READER_KEYS) reaches every key's predictions of the study, an API key its own.
    The read is also held (PNEUMOSCAN_STUDY_READ_HOLD_DAYS, 30) and recorded for the study's
    images scored later (a backlog after an outage, an image sent after the report, a new model
    version scoring it again): 200 when it reached scored images now, 202 when none was."""
    reading_in = await read_reading(request, services)
    found = await asyncio.to_thread(services.records.by_study, study_instance_uid)
    latest: dict[tuple[str, int], PredictionRecord] = {}
    for record in found:  # oldest first: a later prediction of the same image replaces it
        if may_see(services, key_id, record):
            latest[(record.sop_uid or record.id, record.model_version)] = record
    records = list(latest.values())
    now = time.time()
    held = StudyRead(
        study_uid=study_instance_uid,
        recorded=now,
        key_id=key_id,
        reader_label=reading_in.label,
        all_keys=services.keyring.is_reader(key_id),
        expires=now + services.settings.study_read_hold_days * 86400,
    )
    readings = new_readings(key_id, reading_in, records, now)
    try:
        late = await asyncio.to_thread(services.records.set_study_read, held, readings)
    except sqlite3.Error as exc:
        raise unrecorded(exc) from None
    except ValueError:
        raise NotFoundError(
            "No image of this study is scored yet, and too many reads already wait for "
            "studies not yet scored to hold this one: retry later."
        ) from None
    log_readings(key_id, readings)
    for row in late:  # scored while this request ran: read all the same
        log_reading(*row)
    if not readings and not late:
        log.info("study read held", extra={"key_id": key_id, "reader_label": held.reader_label})
        response.status_code = 202
    return StudyReadingPublic(
        study_instance_uid=study_instance_uid,
        readings=[
            reading_public(reading, record.model_name)
            for reading, record in zip(readings, records, strict=True)
        ],
        held_until=datetime.fromtimestamp(held.expires, UTC),
    )


async def read_reading(request: Request, services: ServicesDep) -> ReadingIn:
    settings = services.settings
    with services.upload_budget.hold() as holding:
        body = await read_body(request, MAX_READING_BYTES, settings.upload_timeout_s, holding)
    try:
        return ReadingIn.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidBodyError(
            'Send a JSON body {"label": "NORMAL"} or {"label": "PNEUMONIA"}: '
            + "; ".join(error["msg"] for error in exc.errors()[:3])
        ) from None


async def record_readings(
    services: ServicesDep, key_id: str, reading_in: ReadingIn, records: list[PredictionRecord]
) -> list[Reading]:
    """Store the read of each prediction in one transaction (503 if it cannot be), and log
    each by prediction id, never by the study's or the image's identifiers."""
    readings = new_readings(key_id, reading_in, records, time.time())
    try:
        await asyncio.to_thread(services.records.set_readings, readings)
    except sqlite3.Error as exc:
        raise unrecorded(exc) from None
    log_readings(key_id, readings)
    return readings


def new_readings(
    key_id: str, reading_in: ReadingIn, records: list[PredictionRecord], now: float
) -> list[Reading]:
    return [
        Reading(
            id=record.id,
            recorded=now,
            key_id=key_id,
            reader_label=reading_in.label,
            model_version=record.model_version,
            model_label=record.label,
        )
        for record in records
    ]


def unrecorded(exc: sqlite3.Error) -> StorageUnavailableError:
    return StorageUnavailableError(
        f"The reading could not be recorded ({exc}); retry once PNEUMOSCAN_DATA_DIR has "
        "space again."
    )


def log_readings(key_id: str, readings: list[Reading]) -> None:
    for reading in readings:
        log_reading(
            reading.id, key_id, reading.model_version, reading.model_label, reading.reader_label
        )
