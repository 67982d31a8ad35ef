"""Orthanc Python plugin: score every new frontal chest CR/DX instance with pneumoscan and store
the returned DICOM SR back into the same study.

Configuration (environment of the Orthanc process):
  PNEUMOSCAN_URL        service base URL (default http://127.0.0.1:8000)
  PNEUMOSCAN_API_KEY    API key for X-API-Key (required)
  PNEUMOSCAN_MAX_TRIES  tries before an instance is marked as waiting for the service (or, on
                        HTTP 500, given up as failing on that image) (default 6)
  PNEUMOSCAN_OVERLAYS   which calls also get their explanation overlay (GET /explain, LIME)
                        stored in the study as a Secondary Capture image, series 9902, so a
                        radiologist sees it in the PACS viewer: "pneumonia" (default), "all"
                        or "off". About a second of the service's CPU per overlay.
  PNEUMOSCAN_OVERLAY_TRIES
                        tries of an overlay while the service is busy (503) or unreachable,
                        2 s then 4 s apart (default 3); a refusal (404, 410) is not tried again
  PNEUMOSCAN_CA_FILE    for an https:// URL: PEM CA certificates that verify the service's
                        certificate (default: the system's CAs)
  PNEUMOSCAN_CLIENT_CERT, PNEUMOSCAN_CLIENT_KEY
                        for an https:// URL: the PEM certificate (and key, if not in the same
                        file) presented when the service requires client certificates

Ingest is never blocked: the change callback only wakes a worker thread, which follows Orthanc's
own change log (`/changes`) from a cursor kept in Orthanc's database (global property
PNEUMOSCAN_CURSOR_PROPERTY, default 9901), does the HTTP call, and writes each instance's
result into its `PneumoscanResult` metadata. Connection errors and 408/429/502/503/504 are
retried with exponential backoff (1 s doubling to 60 s) until the service answers, so an outage
loses nothing; after PNEUMOSCAN_MAX_TRIES tries the instance and its study read "error: service
unavailable (retrying)" until then. A refusal (4xx) is recorded as the instance's error, and so
is an HTTP 500 that repeats PNEUMOSCAN_MAX_TRIES times (the service failing on that image).
The cursor moves past an instance only once it is finished, so an instance that was waiting or
being scored when Orthanc stopped (even by kill -9) is scored after the restart; one that
already has its result is not scored twice, and one whose overlay was still being fetched
(`PneumoscanOverlay` reads "pending: <prediction id>") gets it then, unless the study already
holds it. One stopped after its SR was stored but before its call was recorded (global property
PNEUMOSCAN_PENDING_PROPERTY, default 9902, says which) has the call recorded from that SR,
without being scored again. On the very first start the cursor begins at the
last change logged before Orthanc loaded the plugin: images stored from then on are scored,
those stored before the plugin was installed are not.

A study often holds several images (PA and lateral, a repeat exposure). Lateral and oblique
views are not sent (the service would refuse them: its model learned frontal views), nor are
"for processing" images (raw detector data kept beside the displayed one), nor radiographs
whose BodyPartExamined is certainly not the chest (HAND, KNEE, L SPINE...). The
study's `PneumoscanResult` summarises its scored instances, so that no image's call is hidden
by another's: PNEUMONIA if any instance is PNEUMONIA, else an instance's error if any failed
(the study is not fully screened), else NORMAL. `PneumoscanInputCheck` is "flagged" if any
instance was; `PneumoscanAgeCheck` is "outside" if any instance's patient age is outside the
ages the model was trained on, else "within" if any is known to be within, else "unknown".
"""

import base64
import hashlib
import json
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
import uuid

import orthanc

SERVICE = os.environ.get("PNEUMOSCAN_URL", "http://127.0.0.1:8000").rstrip("/")
API_KEY = os.environ.get("PNEUMOSCAN_API_KEY", "")
MAX_TRIES = int(os.environ.get("PNEUMOSCAN_MAX_TRIES", "6"))


def tls_context(service, environ):
    """The TLS settings for an https:// service URL (None for http://): the service's
    certificate verified against PNEUMOSCAN_CA_FILE or the system's CAs, its host name checked,
    and a client certificate where one is configured. A file that cannot be read fails here, as
    Orthanc loads the plugin, not on every image."""
    if not service.lower().startswith("https://"):
        return None
    context = ssl.create_default_context(cafile=environ.get("PNEUMOSCAN_CA_FILE") or None)
    certfile = environ.get("PNEUMOSCAN_CLIENT_CERT")
    if certfile:
        context.load_cert_chain(certfile, environ.get("PNEUMOSCAN_CLIENT_KEY") or None)
    return context


TLS_CONTEXT = tls_context(SERVICE, os.environ)
OVERLAYS = os.environ.get("PNEUMOSCAN_OVERLAYS", "pneumonia").strip().lower() or "pneumonia"
# the overlay's Orthanc instance ID, or "error: ..." (the call itself stands either way)
OVERLAY_METADATA = "PneumoscanOverlay"
# Written before the call is recorded and replaced by the overlay's instance ID (or its error):
# a kill in between leaves this, and the restart fetches the overlay it was waiting for.
OVERLAY_PENDING = "pending: "
OVERLAY_SERIES_DESCRIPTION = "pneumoscan explanation (LIME) - NOT FOR DIAGNOSTIC USE"
SCORED_MODALITIES = {"CR", "DX", "DR"}
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
METADATA = "PneumoscanResult"
# "typical" or "flagged" (the input is unlike the model's training radiographs), when the
# serving model version has an out-of-distribution score
INPUT_CHECK = "PneumoscanInputCheck"
# "within", "outside" or "unknown": the patient's age against the ages the model was trained on
# (the service's X-Age-Check; the shipped model learned from children aged 1-5)
AGE_CHECK = "PneumoscanAgeCheck"
# How a study sums up its instances' checks: the first value found in this order.
SUMMARY_ORDER = {INPUT_CHECK: ("flagged", "typical"), AGE_CHECK: ("outside", "within", "unknown")}
TRANSIENT = {408, 429, 500, 502, 503, 504}
# POST /predict's 409: the first request with this Idempotency-Key is still being scored.
PREDICT_TRANSIENT = TRANSIENT | {409}
# Tries of an overlay's GET /explain while the service is busy or unreachable (2 s, then 4 s
# apart): the call itself is already stored, so the overlay is not waited for as long.
OVERLAY_TRIES = max(1, int(os.environ.get("PNEUMOSCAN_OVERLAY_TRIES", "3")))
# An instance's (and its study's) result while the service stays unreachable or overloaded after
# PNEUMOSCAN_MAX_TRIES tries: the plugin keeps trying, and the label replaces it.
RETRYING = "error: service unavailable (retrying)"
# Orthanc global property holding the sequence number of the last change handled (plugins use
# numbers from 1024 up), and how often the change log is read when no callback wakes the worker.
CURSOR_PROPERTY = int(os.environ.get("PNEUMOSCAN_CURSOR_PROPERTY", "9901"))
POLL_SECONDS = 5.0
# Orthanc global property holding, from just before an SR is stored until its call is recorded,
# what recording it takes (instance, prediction id, label, checks). A kill in between leaves it,
# and after the restart the call is recorded from it if the SR reached Orthanc, instead of the
# image being scored again and a second SR stored beside the first.
PENDING_PROPERTY = int(os.environ.get("PNEUMOSCAN_PENDING_PROPERTY", str(CURSOR_PROPERTY + 1)))
# When Orthanc loaded this script, before it took any image, in the UTC form of the change
# log's "Date" (the database cannot be read this early).
LOADED_AT = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
# Lateral and oblique ViewPosition values: the same set as app.dicom.NOT_FRONTAL_VIEWS (this
# file runs inside Orthanc's Python, without the service's packages; a test keeps them equal).
NOT_FRONTAL_VIEWS = frozenset({"LL", "RL", "LLO", "RLO", "LAT", "LATERAL"})
# BodyPartExamined values that are certainly not the chest: app.dicom.NOT_CHEST_BODY_PARTS,
# compared without spaces, hyphens or underscores. A deny-list: sites write the chest as CHEST,
# THORAX, TORAX, LUNG, PORT CHEST and more, and all of those are sent.
NOT_CHEST_BODY_PARTS = frozenset(
    {
        "ABDOMEN", "ABDOMENPELVIS", "ANKLE", "ARM", "BRAIN", "BREAST", "CALCANEUS", "CLAVICLE",
        "COCCYX", "CSPINE", "ELBOW", "EXTREMITY", "FACE", "FEMUR", "FIBULA", "FINGER", "FOOT",
        "FOREARM", "HAND", "HEAD", "HEEL", "HIP", "HUMERUS", "JAW", "KNEE", "KUB", "LEG",
        "LSPINE", "LSSPINE", "MANDIBLE", "MAXILLA", "NECK", "NOSE", "ORBIT", "PATELLA",
        "PELVIS", "SACRUM", "SCAPULA", "SHOULDER", "SINUS", "SKULL", "SPINE", "SSPINE",
        "THIGH", "THUMB", "TIBIA", "TLSPINE", "TMJ", "TOE", "TSPINE", "WRIST", "ZYGOMA",
    }
)  # fmt: skip
# "For processing" images (raw detector data, not for display): app.dicom.FOR_PROCESSING_CLASSES.
FOR_PROCESSING_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.2.1",
        "1.2.840.10008.5.1.4.1.1.1.3.1",
    }
)

_wake = threading.Event()
_worker_started = threading.Event()


class Transient(Exception):
    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status  # the HTTP status, None when the service could not be reached


def _log(message):
    orthanc.LogWarning("pneumoscan: " + message)


def idempotency_key(instance_id, dicom_bytes):
    """The same for every try of one instance's file, across restarts of Orthanc: a try whose
    answer was lost (a timeout, a reset, Orthanc killed before the SR was stored) gets the
    first prediction's SR again instead of a second prediction. A file changed under the same
    instance is another image, so another key."""
    return f"orthanc-{instance_id}-{hashlib.sha256(dicom_bytes).hexdigest()[:32]}"


def _post_predict(dicom_bytes, key):
    boundary = uuid.uuid4().hex
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="instance.dcm"\r\n'
            "Content-Type: application/dicom\r\n\r\n"
        ).encode()
        + dicom_bytes
        + (f"\r\n--{boundary}--\r\n").encode()
    )
    request = urllib.request.Request(  # noqa: S310 - the configured service URL
        SERVICE + "/predict",
        data=body,
        method="POST",
        headers={
            "Content-Type": "multipart/form-data; boundary=" + boundary,
            "Accept": "application/dicom",
            "X-API-Key": API_KEY,
            "Idempotency-Key": key,
        },
    )
    try:
        with urllib.request.urlopen(  # noqa: S310
            request, timeout=60, context=TLS_CONTEXT
        ) as response:
            headers = response.headers
            checks = {
                INPUT_CHECK: headers.get("X-Input-Check"),
                AGE_CHECK: headers.get("X-Age-Check"),
            }
            return (
                response.read(),
                headers.get("X-Label", ""),
                {name: value for name, value in checks.items() if value},
                headers.get("X-Prediction-Id"),
            )
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode("utf-8", "replace")
        if exc.code in PREDICT_TRANSIENT:
            raise Transient(f"HTTP {exc.code} {detail}", exc.code) from exc
        raise ValueError(f"HTTP {exc.code} {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise Transient(str(exc)) from exc


def _get_overlay(prediction_id):
    """The explanation overlay PNG of one prediction (the key that made it may read it)."""
    request = urllib.request.Request(  # noqa: S310 - the configured service URL
        f"{SERVICE}/explain/{prediction_id}?shape=source", headers={"X-API-Key": API_KEY}
    )
    with urllib.request.urlopen(  # noqa: S310
        request, timeout=120, context=TLS_CONTEXT
    ) as response:
        return response.read()


def _fetch_overlay(prediction_id):
    """_get_overlay, tried OVERLAY_TRIES times over a few seconds when the service is busy or
    unreachable (its explanation queue full: 503; a restart), not for a refusal (404, 410)."""
    delay = 2.0
    for attempt in range(1, OVERLAY_TRIES + 1):
        try:
            return _get_overlay(prediction_id)
        except urllib.error.HTTPError as exc:
            if exc.code not in TRANSIENT or attempt == OVERLAY_TRIES:
                raise
            reason = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            if attempt == OVERLAY_TRIES:
                raise
            reason = type(exc).__name__
        _log(f"overlay not fetched ({reason}, try {attempt}); retrying in {delay:.0f} s")
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")  # the loop returns or raises


def wants_overlay(label):
    return OVERLAYS == "all" or (OVERLAYS == "pneumonia" and label == "PNEUMONIA")


def _store_overlay(instance_id, study_id, tags, label, prediction_id):
    """Store the overlay as a Secondary Capture in a new series of the study (Orthanc copies
    the patient and study attributes from the study). A failure is logged and written into the
    instance's metadata; it does not undo or retry the call, which is already recorded. A busy
    or unreachable service is tried again a few times first (_fetch_overlay)."""
    if not prediction_id or not wants_overlay(label):
        return
    try:
        png = _fetch_overlay(prediction_id)
        request = {
            "Parent": study_id,
            "Tags": {
                "Modality": "OT",  # never CR/DX: the plugin must not score its own overlay
                "SeriesDescription": OVERLAY_SERIES_DESCRIPTION,
                "SeriesNumber": "9902",
                "ConversionType": "WSD",
                "BurnedInAnnotation": "NO",
                "ImageComments": (
                    f"Regions that drove the {label} call on SOP Instance "
                    f"{tags.get('SOPInstanceUID', '?')} (the 224 x 224 model input, shown at "
                    "the image's proportions). Screening assistance only: a clinician reads "
                    "every image."
                )[:1024],
            },
            "Content": "data:image/png;base64," + base64.b64encode(png).decode("ascii"),
        }
        created = json.loads(orthanc.RestApiPost("/tools/create-dicom", json.dumps(request)))
        outcome = created["ID"]
    except Exception as exc:  # noqa: BLE001 - the call is recorded; the overlay is extra
        outcome = f"error: {type(exc).__name__}: {exc}"[:200]
        _log(f"overlay for instance {instance_id} not stored: {outcome}")
    _put_optional_metadata(f"/instances/{instance_id}", OVERLAY_METADATA, outcome)


def _overlay_in_study(study_id, sop_uid):
    """The ID of an overlay already stored for the instance `sop_uid` (Orthanc killed between
    storing it and recording it), or None."""
    if not sop_uid:
        return None
    for instance in json.loads(orthanc.RestApiGet(f"/studies/{study_id}/instances")):
        tags = json.loads(orthanc.RestApiGet(f"/instances/{instance['ID']}/simplified-tags"))
        if tags.get("SeriesDescription") == OVERLAY_SERIES_DESCRIPTION and (
            f"SOP Instance {sop_uid} " in tags.get("ImageComments", "")
        ):
            return instance["ID"]
    return None


def _resume_overlay(instance_id, tags, label):
    """After a restart: an instance whose call was recorded while its overlay was still being
    fetched gets the overlay now, unless it was stored just before the kill."""
    pending = _metadata(instance_id, OVERLAY_METADATA) or ""
    if not pending.startswith(OVERLAY_PENDING):
        return
    study_id = json.loads(orthanc.RestApiGet(f"/instances/{instance_id}/study"))["ID"]
    stored = _overlay_in_study(study_id, tags.get("SOPInstanceUID", ""))
    if stored is not None:
        _log(f"instance {instance_id}: recording the overlay stored just before a restart")
        _put_optional_metadata(f"/instances/{instance_id}", OVERLAY_METADATA, stored)
        return
    _log(f"instance {instance_id}: fetching the overlay a restart interrupted")
    _store_overlay(instance_id, study_id, tags, label, pending[len(OVERLAY_PENDING) :])


def _should_score(tags):
    if tags.get("SOPClassUID", "").startswith(SR_CLASS_PREFIX):
        return False  # our own results (and any other SR)
    if tags.get("Modality", "") not in SCORED_MODALITIES:
        return False
    if tags.get("ViewPosition", "").strip().upper() in NOT_FRONTAL_VIEWS:
        return False
    if tags.get("SOPClassUID", "").strip() in FOR_PROCESSING_CLASSES:
        return False
    if tags.get("PresentationIntentType", "").strip().upper() == "FOR PROCESSING":
        return False
    body_part = re.sub(r"[\s_-]+", "", tags.get("BodyPartExamined", "")).upper()
    return body_part not in NOT_CHEST_BODY_PARTS


def summarise(results):
    """The study's result from its instances' results, the most urgent first."""
    if "PNEUMONIA" in results:
        return "PNEUMONIA"
    errors = [r for r in results if r.startswith("error")]
    if errors:
        return errors[0]
    return "NORMAL" if "NORMAL" in results else "scored"


def _metadata(instance_id, name):
    try:
        value = orthanc.RestApiGet(f"/instances/{instance_id}/metadata/{name}")
    except Exception:  # noqa: BLE001 - Orthanc answers an absent entry with an error
        return None
    return value.decode() if isinstance(value, bytes) else value


def _put_optional_metadata(resource, name, value):
    """Write one of the entries added after PneumoscanResult (checks, overlay); an orthanc.json
    without it is logged rather than failing the instance, which is already scored."""
    try:
        orthanc.RestApiPut(f"{resource}/metadata/{name}", value)
    except Exception as exc:  # noqa: BLE001 - Orthanc refuses a name not in UserMetadata
        _log(f"{name} is not in Orthanc's UserMetadata: {exc}")


def _record(instance_id, study_id, result, checks=None):
    """Store one instance's result and checks ({PneumoscanInputCheck: "flagged", ...}), then
    recompute its study's summary from every instance."""
    for name, value in (checks or {}).items():
        _put_optional_metadata(f"/instances/{instance_id}", name, value)
    orthanc.RestApiPut(f"/instances/{instance_id}/metadata/{METADATA}", result)
    results, found = [], {name: [] for name in SUMMARY_ORDER}
    for instance in json.loads(orthanc.RestApiGet(f"/studies/{study_id}/instances")):
        value = _metadata(instance["ID"], METADATA)
        if value is not None:
            results.append(value)
            for name, values in found.items():
                values.append(_metadata(instance["ID"], name))
    # before the result, so a reader that sees the result sees these too
    for name, order in SUMMARY_ORDER.items():
        summary = next((value for value in order if value in found[name]), None)
        if summary is not None:
            _put_optional_metadata(f"/studies/{study_id}", name, summary)
    orthanc.RestApiPut(f"/studies/{study_id}/metadata/{METADATA}", summarise(results))


def process(instance_id):
    tags = json.loads(orthanc.RestApiGet(f"/instances/{instance_id}/simplified-tags"))
    if not _should_score(tags):
        return
    recorded = _metadata(instance_id, METADATA)
    if recorded not in (None, RETRYING):
        # finished before a restart that came before the cursor moved past it
        _resume_overlay(instance_id, tags, recorded)
        return
    parent = json.loads(orthanc.RestApiGet(f"/instances/{instance_id}/study"))
    study_id = parent["ID"]
    stored = _stored_before_restart(instance_id)
    if stored is not None:
        _log(f"instance {instance_id}: recording the call whose SR was stored before a restart")
        _finish(instance_id, study_id, tags, None, *stored)
        return
    dicom_bytes = orthanc.RestApiGet(f"/instances/{instance_id}/file")
    key = idempotency_key(instance_id, dicom_bytes)
    delay, attempt = 1.0, 0
    while True:
        attempt += 1
        try:
            sr_bytes, label, checks, prediction_id = _post_predict(dicom_bytes, key)
            break
        except Transient as exc:
            if exc.status == 500 and attempt >= MAX_TRIES:
                # the service fails on this image itself: record it, go on with the others
                _log(f"instance {instance_id} failed {attempt} times: {exc}")
                _record(instance_id, study_id, f"error: {exc}"[:200])
                return
            if attempt == MAX_TRIES:
                # unreachable or overloaded: say so on the study, and keep trying (later images
                # wait behind this one; none is lost, and each is scored once the service is back)
                _record(instance_id, study_id, RETRYING)
            _log(f"retrying instance {instance_id} in {delay:.0f} s (try {attempt}: {exc})")
            time.sleep(delay)
            delay = min(delay * 2, 60.0)
        except ValueError as exc:
            _log(f"instance {instance_id} refused by the service: {exc}")
            _record(instance_id, study_id, "error: " + str(exc)[:200])
            return
    _finish(instance_id, study_id, tags, sr_bytes, label, checks, prediction_id)


def _finish(instance_id, study_id, tags, sr_bytes, label, checks, prediction_id):
    """Store the SR (None: it was stored before a restart), record the call, store the
    overlay. PENDING_PROPERTY covers the SR's store until the call is recorded."""
    if sr_bytes is not None:
        pending = {"instance": instance_id, "prediction_id": prediction_id, "label": label}
        orthanc.SetGlobalProperty(PENDING_PROPERTY, json.dumps({**pending, "checks": checks}))
        orthanc.RestApiPost("/instances", sr_bytes)
    if prediction_id and wants_overlay(label):  # replaced by _store_overlay's outcome
        _put_optional_metadata(
            f"/instances/{instance_id}", OVERLAY_METADATA, OVERLAY_PENDING + prediction_id
        )
    _record(instance_id, study_id, label or "scored", checks)
    orthanc.SetGlobalProperty(PENDING_PROPERTY, "")
    described = ", ".join(f"{name} {value}" for name, value in checks.items()) or "no checks"
    _log(f"instance {instance_id} scored {label} ({described}); SR stored")
    _store_overlay(instance_id, study_id, tags, label, prediction_id)


def sr_uid(prediction_id):
    """The SR's SOP Instance UID the service gives a prediction (app.reports.sr_uid; a test
    keeps them equal), or None for an id that is not 32 hex digits."""
    if not re.fullmatch(r"[0-9a-f]{32}", prediction_id or ""):
        return None
    return f"2.25.{int(prediction_id, 16)}"


def _stored_before_restart(instance_id):
    """(label, checks, prediction id) of this instance's call if Orthanc stopped after its SR
    was stored and before the call was recorded; None otherwise (the image is then scored:
    without its SR in Orthanc, that stores no second one)."""
    try:
        pending = json.loads(orthanc.GetGlobalProperty(PENDING_PROPERTY, "") or "null")
    except ValueError:
        return None
    if not isinstance(pending, dict) or pending.get("instance") != instance_id:
        return None
    uid = sr_uid(pending.get("prediction_id"))
    if uid is None:
        return None
    found = json.loads(orthanc.RestApiPost("/tools/lookup", uid))
    if not any(item.get("Type") == "Instance" for item in found):
        return None
    return pending.get("label", ""), pending.get("checks") or {}, pending["prediction_id"]


def _last_change_before_load():
    """The newest change logged before LOADED_AT (0 if none), walking back from the end."""
    end = json.loads(orthanc.RestApiGet("/changes?last"))["Last"]
    while end > 0:
        start = max(end - 100, 0)
        page = json.loads(orthanc.RestApiGet(f"/changes?since={start}&limit=100"))["Changes"]
        older = [c["Seq"] for c in page if c["Seq"] <= end and c["Date"] < LOADED_AT]
        if older:
            return max(older)
        end = start
    return 0


def start_cursor():
    """The last change handled, from Orthanc's database (set on the very first start)."""
    saved = orthanc.GetGlobalProperty(CURSOR_PROPERTY, "")
    if saved:
        return int(saved)
    first = _last_change_before_load()
    orthanc.SetGlobalProperty(CURSOR_PROPERTY, str(first))
    return first


def drain(since):
    """Handle every change after `since`, moving the saved cursor past each one once it is
    finished; returns the new cursor."""
    while True:
        page = json.loads(orthanc.RestApiGet(f"/changes?since={since}&limit=100"))
        for change in page["Changes"]:
            if change["ChangeType"] == "NewInstance":
                try:
                    process(change["ID"])
                except Exception as exc:  # noqa: BLE001 - one instance must not stop the rest
                    _log(f"failed on instance {change['ID']}: {type(exc).__name__}: {exc}")
            since = change["Seq"]
            orthanc.SetGlobalProperty(CURSOR_PROPERTY, str(since))
        if page["Done"]:
            return since


def _work():
    while True:
        try:
            drain(start_cursor())
        except Exception as exc:  # noqa: BLE001 - keep the worker alive whatever happens
            _log(f"reading the change log failed: {type(exc).__name__}: {exc}")
        _wake.wait(POLL_SECONDS)
        _wake.clear()


def on_change(change_type, level, resource_id):
    if change_type == orthanc.ChangeType.ORTHANC_STARTED and not _worker_started.is_set():
        _worker_started.set()
        threading.Thread(target=_work, name="pneumoscan", daemon=True).start()
        if not API_KEY:
            _log("PNEUMOSCAN_API_KEY is not set: every call will be refused")
    elif change_type == orthanc.ChangeType.NEW_INSTANCE:
        _wake.set()


orthanc.RegisterOnChangeCallback(on_change)
