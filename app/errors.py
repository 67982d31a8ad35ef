"""Domain errors. Each carries the HTTP status and a stable code; `app.main` maps them once."""

from __future__ import annotations


class PneumoscanError(Exception):
    """Base class: a failure the caller can act on."""

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InputError(PneumoscanError):
    """The uploaded file cannot be turned into a model input (the one decoder error type)."""

    status_code = 422
    code = "invalid_image"


class UnsupportedMediaError(InputError):
    status_code = 415
    code = "unsupported_media_type"


class UndecodableImageError(InputError):
    status_code = 422
    code = "undecodable_image"


class ImageTooLargeError(InputError):
    status_code = 422
    code = "image_too_large"


class ImageTooSmallError(InputError):
    status_code = 422
    code = "image_too_small"


class BlankImageError(InputError):
    status_code = 422
    code = "blank_image"


class UnsupportedImageError(InputError):
    """A JPEG or PNG whose pixels cannot be a radiograph (1-bit black and white)."""

    status_code = 422
    code = "unsupported_image"


class UnsupportedDicomError(InputError):
    status_code = 422
    code = "unsupported_dicom"


class AgeOutsideTrainingError(InputError):
    """A patient outside the trained ages (DICOM, or X-Patient-Age), with
    PNEUMOSCAN_AGE_OUTSIDE=refuse."""

    status_code = 422
    code = "age_outside_training"


class InvalidPatientAgeError(InputError):
    """An X-Patient-Age header that is not a DICOM Age String."""

    status_code = 422
    code = "invalid_patient_age"


class PayloadTooLargeError(PneumoscanError):
    status_code = 413
    code = "payload_too_large"


class MissingFileError(PneumoscanError):
    status_code = 422
    code = "missing_file"


class InvalidBodyError(PneumoscanError):
    status_code = 422
    code = "invalid_body"


class NotFoundError(PneumoscanError):
    status_code = 404
    code = "not_found"


class GoneError(PneumoscanError):
    status_code = 410
    code = "expired"


class ModelVersionGoneError(PneumoscanError):
    """The model version that made a prediction can no longer be loaded: an overlay drawn by
    another version would not explain that call."""

    status_code = 409
    code = "model_version_unavailable"


class UnauthorizedError(PneumoscanError):
    status_code = 401
    code = "unauthorized"


class ForbiddenError(PneumoscanError):
    status_code = 403
    code = "forbidden"


class NotAcceptableError(PneumoscanError):
    status_code = 406
    code = "not_acceptable"


class ModelUnavailableError(PneumoscanError):
    status_code = 503
    code = "model_unavailable"


class OverloadedError(PneumoscanError):
    status_code = 503
    code = "overloaded"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyRequestsError(OverloadedError):
    """One API key has PNEUMOSCAN_MAX_INFLIGHT_PER_KEY predictions in flight: 429 with
    Retry-After, so one site's backlog cannot take every slot from the others."""

    status_code = 429
    code = "too_many_requests"


class StorageUnavailableError(OverloadedError):
    """The audit record could not be written (disk full, read-only or failing storage). Every
    200 has its record, so without one there is no answer; 503 with Retry-After, since the
    fault is the server's and a retry after space is freed succeeds."""

    code = "storage_unavailable"

    def __init__(self, message: str, retry_after: int = 30) -> None:
        super().__init__(message, retry_after)


class ModelStoreError(Exception):
    """A model version on disk is invalid (incomplete, checksum mismatch, bad metadata)."""
