"""Response models: they are the API contract and the OpenAPI documentation."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from app.records import PredictionRecord

INTENDED_USE = (
    "Screening assistance only: a radiologist reads every image. Not a diagnosis and not a "
    "medical device."
)


class ModelRef(BaseModel):
    name: str = Field(examples=["pneumonia"])
    version: int = Field(examples=[1])


class Probabilities(BaseModel):
    NORMAL: float = Field(ge=0, le=1, examples=[0.08])
    PNEUMONIA: float = Field(ge=0, le=1, examples=[0.92])


class InputInfo(BaseModel):
    format: Literal["JPEG", "PNG", "DICOM"]
    width: int = Field(description="Width of the uploaded image in pixels.")
    height: int = Field(description="Height of the uploaded image in pixels.")
    bytes: int = Field(description="Size of the uploaded file.")
    sha256: str = Field(description="SHA-256 of the uploaded file, as stored in the audit trail.")


class DicomInfo(BaseModel):
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None


class OutOfDistribution(BaseModel):
    flagged: bool = Field(
        description="True when the image is unlike the radiographs the model was trained on "
        "(score above threshold): wrong photometric interpretation or orientation, not a chest "
        "radiograph, or an acquisition far from the training data. Its probabilities are then "
        "unreliable; a clinician reads the image as always."
    )
    score: float = Field(
        description="Mahalanobis distance of the model's pooled features to the training images."
    )
    threshold: float = Field(description="The model card's flag threshold for the score.")


class AgeCheck(BaseModel):
    status: Literal["within", "outside", "unknown"] = Field(
        description="The patient's age (DICOM PatientAge, or PatientBirthDate against the study "
        "date) against the ages of the patients whose radiographs trained the model: `outside` "
        "means the probabilities come from a population the model never saw (the shipped model "
        "learned from children aged 1-5); `unknown` for a JPEG or PNG sent without the "
        "`X-Patient-Age` header, or a DICOM without a readable age. The age itself is never "
        "returned or stored."
    )
    trained_age_years: list[int] = Field(
        description="[low, high] completed years of the training population, both included.",
        examples=[[1, 5]],
    )
    source: Literal["PatientAge", "PatientBirthDate", "X-Patient-Age"] | None = Field(
        None,
        description="Where the age came from: the DICOM attribute, or the request's "
        "X-Patient-Age header (used only when the DICOM object has no readable age); null "
        "when unknown.",
    )


class Timings(BaseModel):
    decode_ms: float
    queue_ms: float
    inference_ms: float
    total_ms: float
    batch_size: int = Field(
        description="How many images shared the model call; 0 for an answer given again for "
        "a retried Idempotency-Key (no model call)."
    )


Label = Literal["NORMAL", "PNEUMONIA"]


class PredictionCore(BaseModel):
    """What a prediction's answer and its stored record (GET /predictions/{id}) share."""

    prediction_id: str = Field(description="Unguessable id (128 random bits) for /explain.")
    label: Label = Field(
        description="PNEUMONIA when P(PNEUMONIA) >= threshold (a screening operating point)."
    )
    probabilities: Probabilities
    threshold: float = Field(description="Decision threshold on P(PNEUMONIA) of this model.")
    model: ModelRef
    explain_url: str | None = Field(
        description="GET it for the LIME overlay (the key that made the prediction); null in "
        "answers to a reader key, which cannot pull overlays."
    )
    input: InputInfo
    dicom: DicomInfo | None = None

    @staticmethod
    def fields_of(record: PredictionRecord, explain_url: str | None) -> dict[str, Any]:
        """The shared fields, from the audit record: what the answer to POST /predict (first
        or replayed) and GET /predictions/{id} say alike."""
        uids = (record.study_uid, record.series_uid, record.sop_uid)
        return {
            "prediction_id": record.id,
            "label": record.label,
            "probabilities": Probabilities(NORMAL=record.p_normal, PNEUMONIA=record.p_pneumonia),
            "threshold": record.threshold,
            "model": ModelRef(name=record.model_name, version=record.model_version),
            "explain_url": explain_url,
            "input": InputInfo(
                format=record.input_format,
                width=record.width,
                height=record.height,
                bytes=record.input_bytes,
                sha256=record.image_sha256,
            ),
            "dicom": DicomInfo(
                study_instance_uid=uids[0], series_instance_uid=uids[1], sop_instance_uid=uids[2]
            )
            if any(uids)
            else None,
        }


class PredictionPublic(PredictionCore):
    out_of_distribution: OutOfDistribution | None = Field(
        None, description="Null when the model version has no out-of-distribution score."
    )
    age_check: AgeCheck | None = Field(
        None, description="Null when the service's age check is off (PNEUMOSCAN_TRAINED_AGE_YEARS)."
    )
    timings: Timings
    intended_use: str = INTENDED_USE

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "prediction_id": "0f5b8b0c2a3e4f7d9c1b2a3e4f5d6c7b",
                    "label": "PNEUMONIA",
                    "probabilities": {"NORMAL": 0.04, "PNEUMONIA": 0.96},
                    "threshold": 0.31,
                    "model": {"name": "pneumonia", "version": 1},
                    "explain_url": "/explain/0f5b8b0c2a3e4f7d9c1b2a3e4f5d6c7b",
                    "input": {
                        "format": "JPEG",
                        "width": 1176,
                        "height": 768,
                        "bytes": 120000,
                        "sha256": "9f...",
                    },
                    "dicom": None,
                    "out_of_distribution": {"flagged": False, "score": 6.9, "threshold": 17.9},
                    "age_check": {"status": "unknown", "trained_age_years": [1, 5], "source": None},
                    "timings": {
                        "decode_ms": 9.1,
                        "queue_ms": 0.4,
                        "inference_ms": 3.2,
                        "total_ms": 14.0,
                        "batch_size": 1,
                    },
                    "intended_use": INTENDED_USE,
                }
            ]
        }
    }


class ReadingIn(BaseModel):
    """The radiologist's read of the image, reported by the RIS or reporting system."""

    label: Label = Field(description="Pneumonia present (PNEUMONIA) or not (NORMAL), as read.")

    model_config = {"extra": "forbid", "json_schema_extra": {"examples": [{"label": "NORMAL"}]}}


class ReadingPublic(BaseModel):
    prediction_id: str
    reader_label: Label = Field(description="The radiologist's read, as reported.")
    model_label: Label = Field(description="The model's call on the same image.")
    agrees: bool
    model: ModelRef
    recorded: datetime = Field(description="When the read was reported (UTC).")


class StudyReadingPublic(BaseModel):
    study_instance_uid: str
    readings: list[ReadingPublic] = Field(
        description="The read as recorded for each scored image of the study: the latest "
        "prediction per SOP instance and model version. Empty (status 202) when none is "
        "scored yet."
    )
    held_until: datetime = Field(
        description="Until when the read is also recorded for images of the study scored "
        "later (UTC)."
    )


class PredictionStored(PredictionCore):
    """A prediction as the audit trail holds it."""

    created: datetime = Field(description="When the prediction was made (UTC).")
    ood_score: float | None = Field(
        None, description="The out-of-distribution score (null for a version without one)."
    )
    age_check: Literal["within", "outside", "unknown"] | None = Field(
        None, description="The age check's verdict (null when the check was off)."
    )
    reading: ReadingPublic | None = Field(
        None, description="The radiologist's read, once reported with PUT .../reading."
    )
    intended_use: str = INTENDED_USE


class ErrorBody(BaseModel):
    code: str = Field(examples=["undecodable_image"])
    message: str = Field(examples=["The JPEG file could not be decoded (truncated or corrupt)."])


class ErrorResponse(BaseModel):
    error: ErrorBody


class VersionInfo(BaseModel):
    version: int
    status: Literal["serving", "available", "failed"]
    detail: str | None = None


class ModelsPublic(BaseModel):
    name: str
    serving: int | None
    runtime: Literal["tflite", "savedmodel"] | None = Field(
        None,
        description="What runs the serving version: LiteRT on its model.tflite, or TensorFlow.",
    )
    pinned: int | None
    versions: list[VersionInfo]
    card: dict | None = Field(None, description="model.json of the serving version.")


class Health(BaseModel):
    status: str
    model: ModelRef | None = None
    reason: str | None = Field(
        None, description="Why the service is not ready, where the model is not the reason."
    )


def error_responses(
    *codes: int, descriptions: dict[int, str] | None = None
) -> dict[int | str, dict]:
    """OpenAPI entries for `codes`, described as below unless `descriptions` says otherwise."""
    described = {
        400: "The client closed the connection mid-upload.",
        401: "Missing or wrong X-API-Key.",
        403: "A reader key (PNEUMOSCAN_READER_KEYS), which only reports reads and looks up "
        "predictions.",
        404: "Unknown prediction id (or one made with another key).",
        406: "The Accept header allows none of the answers (application/json, "
        "application/fhir+json, application/dicom), or asks only for an SR (application/dicom) "
        "for a non-DICOM input.",
        409: "The model version that made the prediction is no longer in the store.",
        408: "The upload did not arrive in time.",
        410: "The stored image passed its retention period.",
        413: "Upload (or request body) larger than the size limit.",
        415: "Not a JPEG, PNG or DICOM Part 10 file.",
        422: "Undecodable, truncated, too large (pixels), too small, blank or 1-bit image, or "
        "unsupported DICOM (multi-frame, colour palette, floating-point pixels, not a radiograph "
        "modality such as CT, a lateral or oblique view, a 'for processing' image, a body part "
        "other than the chest, or 1-bit pixels), a patient outside the trained ages (with "
        "PNEUMOSCAN_AGE_OUTSIDE=refuse), a DICOM no SR can reference (SR answers), or a "
        "malformed X-Patient-Age or Idempotency-Key header, or a key used for another image.",
        429: "This API key has PNEUMOSCAN_MAX_INFLIGHT_PER_KEY predictions in flight (see "
        "Retry-After).",
        503: "No model loaded, a queue is full, or the audit record could not be written "
        "(see Retry-After).",
    }
    described.update(descriptions or {})
    return {code: {"model": ErrorResponse, "description": described[code]} for code in codes}


class StudyPredictions(BaseModel):
    study_instance_uid: str
    predictions: list[PredictionStored] = Field(
        description="Every prediction of the study, oldest first (an image sent twice appears "
        "twice)."
    )
