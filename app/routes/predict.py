"""POST /predict: upload -> decode -> micro-batched model -> audit record -> JSON."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import secrets
import sqlite3
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.admission import UploadHolding
from app.classifier import LoadedModel
from app.deps import API_KEY_SECURITY, services_and_key_id
from app.errors import (
    AgeOutsideTrainingError,
    InvalidPatientAgeError,
    MissingFileError,
    NotAcceptableError,
    OverloadedError,
    PayloadTooLargeError,
    PneumoscanError,
    StorageUnavailableError,
    TooManyRequestsError,
    UnsupportedDicomError,
    UnsupportedMediaError,
)
from app.idempotency import (
    IDEMPOTENCY_HEADER,
    REPLAYED_HEADER,
    ClaimedElsewhere,
    IdempotencyKeyInUseError,
    IdempotencyKeyReusedError,
    ReplayEntry,
    idempotency_key,
    key_digest,
)
from app.imaging import DecodedImage, check_content, decode_image, decode_small_raster
from app.negotiation import DICOM, FHIR, JSON, choose
from app.population import AGE_HEADER, AgeRange, PatientAge, age_from_header, age_status
from app.records import PredictionRecord, RecordStore
from app.reports import build_fhir, build_sr, sr_problem
from app.schemas import (
    AgeCheck,
    OutOfDistribution,
    PredictionPublic,
    Timings,
    error_responses,
)
from app.services import Services
from app.settings import MULTIPART_OVERHEAD, Settings

log = logging.getLogger("pneumoscan.predict")
router = APIRouter(tags=["predict"])

RAW_BODY_TYPES = frozenset(
    {"image/jpeg", "image/png", "application/dicom", "application/octet-stream"}
)

OPENAPI_BODY = {
    "parameters": [
        {
            "name": AGE_HEADER,
            "in": "header",
            "required": False,
            "description": "The patient's age at the radiograph as a DICOM Age String (045Y, "
            "018M, 010W, 020D), for the age check of a JPEG or PNG, which carries no age. A "
            "DICOM object's own PatientAge or PatientBirthDate is used first. Never returned, "
            "stored or logged.",
            "schema": {"type": "string", "pattern": "^[0-9]{3}[DWMY]$"},
        },
        {
            "name": IDEMPOTENCY_HEADER,
            "in": "header",
            "required": False,
            "description": "A key of the caller's making, new for each image (a UUID), sent "
            "again unchanged with each retry of that request: a retry within "
            "PNEUMOSCAN_IDEMPOTENCY_HOURS (24 h) gets the first prediction again, with "
            "`Idempotent-Replayed: true`, in the representation it asks for, instead of a "
            "second prediction. Scoped to the API key; only its SHA-256 is stored. The same key "
            "with another image: 422 `idempotency_key_reused`; while the first request is "
            "still being scored: 409 with Retry-After.",
            "schema": {"type": "string", "pattern": "^[!#-\\[\\]-~]{1,255}$"},
        },
    ],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "JPEG, PNG or DICOM Part 10 chest radiograph.",
                        }
                    },
                }
            },
            **{
                media_type: {"schema": {"type": "string", "format": "binary"}}
                for media_type in ("image/jpeg", "image/png", "application/dicom")
            },
        },
    },
}


class FormTimeoutError(PneumoscanError):
    status_code = 408
    code = "upload_timeout"


class UploadAbortedError(PneumoscanError):
    status_code = 400
    code = "upload_aborted"


async def read_body(
    request: Request, limit: int, timeout_s: float, holding: UploadHolding
) -> bytes:
    """Read the request body, refusing it (413) as soon as it passes the limit, and counting
    the bytes received against the service's upload memory budget (503 when that is full; a
    declared length that does not fit is refused before a byte is read)."""
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit():  # "²" is no length to int()
        if int(declared) > limit:
            raise PayloadTooLargeError(
                f"Upload of {int(declared)} bytes exceeds the limit of {limit} bytes."
            )
        holding.check(int(declared))
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise PayloadTooLargeError(f"Upload exceeds the limit of {limit} bytes.")
                holding.take(len(chunk))
    except ClientDisconnect:
        raise UploadAbortedError("The client closed the connection mid-upload.") from None
    except TimeoutError:
        raise FormTimeoutError(f"The upload did not complete within {timeout_s:g} s.") from None
    return bytes(body)


async def read_upload(
    request: Request, max_bytes: int, timeout_s: float, holding: UploadHolding
) -> bytes:
    """The uploaded file's bytes: multipart field `file`, or the whole body when it is sent as
    `image/jpeg`, `image/png`, `application/dicom` or `application/octet-stream` (what a
    DICOMweb-minded integrator sends, and one parse less). The format is always sniffed from
    the bytes; the content type only says how they are wrapped."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    coding = request.headers.get("content-encoding", "").strip().lower()
    if coding not in ("", "identity"):  # before a byte is read: the sniffing would only see noise
        raise UnsupportedMediaError(
            f"Content-Encoding {coding[:40]!r} is not accepted: send the image bytes "
            "uncompressed (JPEG, PNG and compressed DICOM syntaxes are compressed already)."
        )
    if media_type in RAW_BODY_TYPES:
        data = await read_body(request, max_bytes, timeout_s, holding)
        if not data:
            raise MissingFileError("The request body is empty: send the image bytes.")
        return data
    if media_type != "multipart/form-data":
        raise UnsupportedMediaError(
            "Send the image as multipart/form-data with the file in field 'file', or as the "
            "request body with Content-Type image/jpeg, image/png, application/dicom or "
            f"application/octet-stream (got Content-Type {content_type[:60]!r})."
        )
    body = await read_body(request, max_bytes + MULTIPART_OVERHEAD, timeout_s, holding)

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    replayed = Request(request.scope, replay)
    try:
        form = await replayed.form(max_files=1, max_fields=16)
    except StarletteHTTPException as exc:
        raise MissingFileError(f"Malformed multipart body: {exc.detail}") from None
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise MissingFileError(f"Malformed multipart body: {type(exc).__name__}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise MissingFileError("No file in multipart field 'file': send -F 'file=@image.dcm'.")
        data = await upload.read(max_bytes + 1)
    finally:
        await form.close()
    if len(data) > max_bytes:
        raise PayloadTooLargeError(f"File exceeds the limit of {max_bytes} bytes.")
    return data


# Above this size the upload's SHA-256 runs on a worker thread while the image decodes and the
# model runs (hashlib releases the GIL): ~1 ms per MB here, tens of ms for a large DICOM.
HASH_INLINE_MAX_BYTES = 64 * 1024


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload_digest(data: bytes) -> asyncio.Future[str]:
    """The SHA-256 the audit trail records, started now and awaited when the record is built.
    A plain executor future, not a task: if the request fails first, the hash just finishes."""
    loop = asyncio.get_running_loop()
    if len(data) <= HASH_INLINE_MAX_BYTES:
        future: asyncio.Future[str] = loop.create_future()
        future.set_result(sha256_hex(data))
        return future
    return loop.run_in_executor(None, sha256_hex, data)


def out_of_distribution(score: float | None, threshold: float | None) -> OutOfDistribution | None:
    if score is None or threshold is None:
        return None
    return OutOfDistribution(flagged=score > threshold, score=round(score, 3), threshold=threshold)


def trained_ages(model: LoadedModel, settings: Settings) -> AgeRange | None:
    """The ages the model was trained on: its card's, else the setting's; None when off."""
    return settings.trained_ages(model.trained_ages)


def age_check(decoded: DecodedImage, trained: AgeRange | None) -> AgeCheck | None:
    if trained is None:
        return None
    age = decoded.patient_age
    return AgeCheck(
        status=age_status(age, trained),
        trained_age_years=trained.as_list(),
        source=None if age is None else age.source,
    )


def refuse_outside_ages(decoded: DecodedImage, services: Services) -> None:
    """With PNEUMOSCAN_AGE_OUTSIDE=refuse, a patient outside the trained ages (by the DICOM,
    or X-Patient-Age) gets 422 before the model runs (nothing is recorded)."""
    if services.settings.age_outside != "refuse" or decoded.patient_age is None:
        return
    trained = trained_ages(services.manager.get(), services.settings)
    check = age_check(decoded, trained)
    if check is not None and check.status == "outside":
        services.metrics.rejected.labels("age_outside_training").inc()
        low, high = check.trained_age_years
        where = AGE_HEADER if check.source == AGE_HEADER else f"DICOM {check.source}"
        raise AgeOutsideTrainingError(
            f"The patient's age ({where}) is outside the {low}-{high} years of "
            "the patients whose radiographs trained this model, and this service refuses such "
            "images (PNEUMOSCAN_AGE_OUTSIDE=refuse): a clinician reads it without pneumoscan."
        )


def patient_age_header(request: Request) -> PatientAge | None:
    """The X-Patient-Age header's age; 422 when it is not a DICOM Age String (the message
    never quotes the value)."""
    given = request.headers.getlist(AGE_HEADER)
    if len(given) > 1:  # two ages for one image: neither can be trusted
        raise InvalidPatientAgeError(f"Send {AGE_HEADER} once (it came {len(given)} times).")
    try:
        return age_from_header(given[0] if given else None)
    except ValueError as exc:
        raise InvalidPatientAgeError(f"{exc}.") from None


async def decode_in_pool(services: Services, data: bytes) -> DecodedImage:
    """Large uploads (full-resolution radiographs, DICOM) decode on the bounded pool."""
    settings = services.settings
    if services.decode_slots.locked():
        services.metrics.rejected.labels("decode_queue_full").inc()
        raise OverloadedError("Too many uploads are being decoded; retry shortly.", 1)
    async with services.decode_slots:
        loop = asyncio.get_running_loop()
        services.batcher.incoming += 1
        try:
            return await loop.run_in_executor(
                services.decode_pool,
                lambda: decode_image(
                    data, max_pixels=settings.max_pixels, min_side=settings.min_side
                ),
            )
        finally:
            services.batcher.incoming -= 1


@router.post(
    "/predict",
    response_model=PredictionPublic,
    summary="Score a chest radiograph (JPEG, PNG or DICOM)",
    openapi_extra={**OPENAPI_BODY, **API_KEY_SECURITY},
    responses={
        200: {
            "content": {
                "application/fhir+json": {
                    "schema": {"type": "object"},
                    "example": {"resourceType": "DiagnosticReport"},
                },
                "application/dicom": {"schema": {"type": "string", "format": "binary"}},
            },
            "description": "JSON by default; `Accept: application/fhir+json` gives a FHIR R4 "
            "DiagnosticReport; `Accept: application/dicom` (DICOM input only) gives a "
            "Comprehensive 3D SR in the source study, with headers `X-Prediction-Id`, `X-Label` "
            "and, for a model with the out-of-distribution score, `X-Input-Check` (`typical` or "
            "`flagged`), and, unless the age check is off, `X-Age-Check` (`within`, `outside` "
            "or `unknown`).",
        },
        **error_responses(
            401,
            403,
            406,
            408,
            409,
            413,
            415,
            422,
            429,
            503,
            descriptions={
                409: "A request with this Idempotency-Key is still being scored (see Retry-After)."
            },
        ),
    },
)
async def predict(request: Request) -> PredictionPublic | Response:
    """Pneumonia / normal probabilities for one radiograph; a clinician reads every image."""
    started = time.perf_counter()
    services, key_id = services_and_key_id(request)
    services.manager.get()  # 503 before reading a large body when no model is loaded
    try:
        services.key_slots.acquire(key_id)  # 429 before reading the body: a key at its limit
    except TooManyRequestsError:
        services.metrics.rejected.labels("key_inflight_limit").inc()
        raise
    try:
        # The upload counts against the memory budget until the answer is built.
        with services.upload_budget.hold() as holding:
            return await score_upload(request, services, key_id, started, holding)
    finally:
        services.key_slots.release(key_id)


async def score_upload(
    request: Request, services: Services, key_id: str, started: float, holding: UploadHolding
) -> Response:
    settings = services.settings
    given_age = patient_age_header(request)  # refused before the body is read
    idempotency = idempotency_key(request.headers.getlist(IDEMPOTENCY_HEADER))
    key_hash = None if idempotency is None else key_digest(idempotency)
    try:
        data = await read_upload(
            request, settings.max_upload_bytes, settings.upload_timeout_s, holding
        )
    except OverloadedError:
        services.metrics.rejected.labels("upload_memory_full").inc()
        raise
    digest = upload_digest(data)
    decode_started = time.perf_counter()
    decoded = decode_small_raster(data, max_pixels=settings.max_pixels, min_side=settings.min_side)
    if decoded is None:  # large, progressive or DICOM: off the event loop
        decoded = await decode_in_pool(services, data)
    check_content(decoded.pixels)
    if given_age is not None and decoded.patient_age is None:
        decoded = dataclasses.replace(decoded, patient_age=given_age)
    # Negotiated before the model runs, so nothing is recorded for an answer never delivered.
    accept = request.headers.get("accept")
    is_dicom = decoded.source is not None
    answer_type = choose(accept, (JSON, FHIR, DICOM) if is_dicom else (JSON, FHIR))
    if answer_type is None:
        if not is_dicom and choose(accept, (DICOM,)) == DICOM:
            raise NotAcceptableError(
                "A DICOM SR can only be returned for a DICOM input; ask for application/json."
            )
        raise NotAcceptableError(
            "The Accept header allows none of the answers: application/json (the default), "
            "application/fhir+json, or application/dicom (a DICOM SR, for DICOM inputs)."
        )
    if answer_type == DICOM:
        problem = sr_problem(decoded.source)
        if problem is not None:
            raise UnsupportedDicomError(
                f"No DICOM SR can be made for this object: {problem}. Ask for "
                "application/json (or application/fhir+json) to have it scored."
            )
    decode_ms = (time.perf_counter() - decode_started) * 1000
    upload = Upload(data, decoded, digest, answer_type, decode_ms)
    if key_hash is None:
        return await score(request, services, key_id, started, upload, None)
    # One request per key at a time: a retry racing its first request waits for its answer.
    services.idempotency_in_flight.claim(key_id, key_hash)
    try:
        return await score_once(request, services, key_id, started, upload, key_hash)
    finally:
        services.idempotency_in_flight.release(key_id, key_hash)


@dataclasses.dataclass(frozen=True)
class Upload:
    """A decoded upload, with the answer it asked for, ready for the model."""

    data: bytes
    decoded: DecodedImage
    digest: asyncio.Future[str]
    answer_type: str
    decode_ms: float


async def score_once(
    request: Request,
    services: Services,
    key_id: str,
    started: float,
    upload: Upload,
    key_hash: str,
) -> Response:
    """With an Idempotency-Key: the first prediction made with it, answered again, else a new
    one recorded with the key (app.idempotency). The key is claimed in the audit database
    first, so that an instance sharing it that gets a retry meanwhile waits (409) instead of
    scoring the image a second time."""
    records = services.records
    sha256 = await upload.digest
    try:
        used = await asyncio.to_thread(records.claim_idempotency_key, key_id, key_hash, sha256)
    except sqlite3.Error as exc:
        services.metrics.rejected.labels("storage_unavailable").inc()
        raise StorageUnavailableError(
            f"The {IDEMPOTENCY_HEADER} could not be looked up or claimed in the audit database "
            f"({exc}): free space in the service's data directory (PNEUMOSCAN_DATA_DIR) or "
            "retry later."
        ) from exc
    if used is None:  # claimed: the prediction's transaction ends the claim
        try:
            return await score(request, services, key_id, started, upload, key_hash)
        except BaseException:
            # Not awaited: a cancelled request must not wait; the claim lapses if this fails.
            with contextlib.suppress(RuntimeError):  # the executor is shutting down
                asyncio.get_running_loop().run_in_executor(
                    None, release_claim, records, key_id, key_hash
                )
            raise
    if used.image_sha256 != sha256:
        raise IdempotencyKeyReusedError(
            f"This {IDEMPOTENCY_HEADER} was used for another image in the last "
            f"{services.settings.idempotency_hours:g} h: send a new key for each image (the "
            "same key only to retry the same request)."
        )
    if isinstance(used, ClaimedElsewhere):
        raise IdempotencyKeyInUseError()
    record = await asyncio.to_thread(services.records.get, used.prediction_id)
    if record is None:  # the row outlived its prediction: cannot happen, but never a 500
        return await score(request, services, key_id, started, upload, key_hash)
    services.metrics.idempotent_replays.inc()
    log.info(
        "prediction replayed",
        extra={"prediction_id": record.id, "key_id": key_id, "answer": upload.answer_type},
    )
    timings = Timings(
        decode_ms=round(upload.decode_ms, 2),
        queue_ms=0.0,
        inference_ms=0.0,
        total_ms=round((time.perf_counter() - started) * 1000, 2),
        batch_size=0,
    )
    response = await answer(
        request, record, upload, used.entry.ood_threshold, used.entry.age(), timings
    )
    response.headers[REPLAYED_HEADER] = "true"
    return response


def release_claim(records: RecordStore, key_id: str, key_hash: str) -> None:
    try:
        records.release_idempotency_claim(key_id, key_hash)
    except sqlite3.Error as exc:
        log.warning("an Idempotency-Key claim was left to lapse: %s", type(exc).__name__)


async def score(
    request: Request,
    services: Services,
    key_id: str,
    started: float,
    upload: Upload,
    key_hash: str | None,
) -> Response:
    """Run the model, record the prediction (with its Idempotency-Key), answer."""
    settings = services.settings
    decoded = upload.decoded
    refuse_outside_ages(decoded, services)
    services.metrics.queue_depth.set(services.batcher.queue.qsize())
    try:
        result = await services.batcher.predict(decoded.pixels)
    except OverloadedError:
        services.metrics.rejected.labels("inference_queue_full").inc()
        raise
    services.metrics.batch_size.observe(result.batch_size)
    model = result.model
    p_normal, p_pneumonia = (float(v) for v in result.probabilities)
    label = "PNEUMONIA" if p_pneumonia >= model.threshold else "NORMAL"
    prediction_id = secrets.token_hex(16)
    ages = age_check(decoded, trained_ages(model, settings))
    sha256 = await upload.digest
    uids = decoded.dicom
    record = PredictionRecord(
        id=prediction_id,
        created=time.time(),
        key_id=key_id,
        model_name=model.name,
        model_version=model.version,
        p_normal=p_normal,
        p_pneumonia=p_pneumonia,
        label=label,
        threshold=model.threshold,
        image_sha256=sha256,
        input_format=decoded.format,
        input_bytes=len(upload.data),
        width=decoded.width,
        height=decoded.height,
        study_uid=uids.get("StudyInstanceUID"),
        series_uid=uids.get("SeriesInstanceUID"),
        sop_uid=uids.get("SOPInstanceUID"),
        ood_score=result.ood_score,
        age_check=None if ages is None else ages.status,
    )
    replay = None
    if key_hash is not None:
        expires = record.created + settings.idempotency_hours * 3600
        replay = ReplayEntry.of(key_hash, expires, model.ood_threshold, ages)
    try:
        await services.writer.add(record, decoded.pixels, replay)
    except StorageUnavailableError:
        services.metrics.rejected.labels("storage_unavailable").inc()
        raise
    services.metrics.predictions.labels(label, str(model.version)).inc()
    ood = out_of_distribution(result.ood_score, model.ood_threshold)
    if ood is not None and ood.flagged:
        services.metrics.out_of_distribution.labels(str(model.version)).inc()
    if ages is not None:
        services.metrics.age_checks.labels(ages.status, str(model.version)).inc()
    # Every recorded prediction is logged, whichever representation carries it (before round
    # 18, FHIR and SR answers, which a PACS integration asks for, were missing from the log).
    log.info(
        "prediction",
        extra={
            "prediction_id": prediction_id,
            "key_id": key_id,
            "model_version": model.version,
            "label": label,
            "ood_flagged": None if ood is None else ood.flagged,
            "age_check": None if ages is None else ages.status,
            "answer": upload.answer_type,
        },
    )
    timings = Timings(
        decode_ms=round(upload.decode_ms, 2),
        queue_ms=round(result.queue_ms, 2),
        inference_ms=round(result.inference_ms, 2),
        total_ms=round((time.perf_counter() - started) * 1000, 2),
        batch_size=result.batch_size,
    )
    return await answer(request, record, upload, model.ood_threshold, ages, timings)


async def answer(
    request: Request,
    record: PredictionRecord,
    upload: Upload,
    ood_threshold: float | None,
    ages: AgeCheck | None,
    timings: Timings,
) -> Response:
    """The prediction in the representation negotiated: made from the record, so that a replay
    gives what the first answer gave (but its timings)."""
    ood = out_of_distribution(record.ood_score, ood_threshold)
    if upload.answer_type == FHIR:
        fhir = build_fhir(record, record.model_name, record.model_version, ood_threshold, ages)
        return JSONResponse(
            fhir, media_type="application/fhir+json", headers={"X-Prediction-Id": record.id}
        )
    if upload.answer_type == DICOM:
        sr = await asyncio.to_thread(
            build_sr,
            upload.decoded.source,
            record,
            record.model_name,
            record.model_version,
            ood_threshold,
            ages,
        )
        headers = {"X-Prediction-Id": record.id, "X-Label": record.label}
        if ood is not None:  # for a PACS plugin, which gets no JSON body with the SR
            headers["X-Input-Check"] = "flagged" if ood.flagged else "typical"
        if ages is not None:
            headers["X-Age-Check"] = ages.status
        return Response(sr, media_type="application/dicom", headers=headers)
    # What url_for("explain") gives, without its route search on every request.
    explain_url = f"{request.scope.get('root_path', '')}/explain/{record.id}"
    body = PredictionPublic(
        **PredictionPublic.fields_of(record, explain_url),
        out_of_distribution=ood,
        age_check=ages,
        timings=timings,
    )
    # Serialised once by pydantic-core; returning the model would validate it a second time.
    return Response(body.model_dump_json(), media_type="application/json")
