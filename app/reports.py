"""Results as PACS and RIS read them: a DICOM Comprehensive 3D SR (TID 1500, IHE AI Results
style) in the source study, and an HL7 FHIR R4 DiagnosticReport with its Observation and Device.

Both say plainly that the result is an unverified screening aid, not a diagnosis.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
from datetime import UTC, datetime

from app.records import PredictionRecord
from app.schemas import AgeCheck

SHORT_CAUTION = "AI screening aid, unverified: NOT FOR DIAGNOSTIC USE"  # fits a LO (64)
CAUTION = f"{SHORT_CAUTION}. A radiologist must read the image."
SNOMED = "http://snomed.info/sct"
FINDINGS = {"PNEUMONIA": ("233604007", "Pneumonia"), "NORMAL": ("17621005", "Normal")}
PRIVATE_SCHEME = "99PNEUMOSCAN"


def build_sr(
    source,
    record: PredictionRecord,
    model_name: str,
    model_version: int,
    ood_threshold: float | None = None,
    age: AgeCheck | None = None,
) -> bytes:
    """A Comprehensive 3D SR with the result, in the source image's study (new series). Made
    from the record alone, with no clock or random UID, so the same prediction always gives the
    same object: a replayed answer (Idempotency-Key) is the SR the PACS may already hold."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    software = f"{model_name} v{model_version}"
    # DICOM dates without an offset are local: the prediction's time, as highdicom's clock is
    created = datetime.fromtimestamp(record.created)
    source = _with_type2_attributes(source)
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"pneumoscan-{model_name}",
        version=str(model_version),
        family=codes.cid7162.ArtificialIntelligence,
    )
    finding_code, finding_meaning = FINDINGS[record.label]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("tracking", record.id), identifier=f"pneumoscan prediction {record.id}"
        ),
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=hd.sr.CodedConcept("121071", "DCM", "Finding"),
                value=hd.sr.CodedConcept(finding_code, "SCT", finding_meaning),
            ),
            *_age_evaluations(age),
        ],
        measurements=[
            hd.sr.Measurement(
                name=hd.sr.CodedConcept("P-PNEUMONIA", PRIVATE_SCHEME, "Probability of pneumonia"),
                value=round(record.p_pneumonia, 6),
                unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
                algorithm_id=algorithm,
            ),
            hd.sr.Measurement(
                name=hd.sr.CodedConcept("THRESHOLD", PRIVATE_SCHEME, "Decision threshold"),
                value=round(record.threshold, 6),
                unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
            ),
            *_ood_measurements(record, ood_threshold),
        ],
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", software),  # the model version is the observing device
            name="pneumoscan",
            manufacturer_name="pneumoscan",
            model_name=software,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray"),
        imaging_measurements=[group],
    )
    equipment = hd.ContributingEquipment(
        manufacturer="pneumoscan",
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=software,
        software_versions=str(model_version),
        contribution_datetime=created.strftime("%Y%m%d%H%M%S"),  # its own entry: see below
        contribution_description=SHORT_CAUTION,
    )
    sr = hd.sr.Comprehensive3DSR(
        specific_character_set=SR_CHARSET,
        evidence=[source],
        content=report,
        series_instance_uid=derived_uid("series", record.id),
        series_number=9901,
        sop_instance_uid=sr_uid(record.id),
        instance_number=1,
        manufacturer="pneumoscan",
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[equipment],
    )
    sr.SeriesDescription = "pneumoscan AI result - NOT FOR DIAGNOSTIC USE"
    # highdicom dates the object, and the entry it adds for itself, by the clock: the
    # prediction's time instead, so that the same prediction gives the same bytes
    for prefix in ("InstanceCreation", "Content"):
        setattr(sr, f"{prefix}Date", created.strftime("%Y%m%d"))
        setattr(sr, f"{prefix}Time", created.strftime("%H%M%S.%f"))
    for contribution in sr.ContributingEquipmentSequence:
        contribution.ContributionDateTime = created.strftime("%Y%m%d%H%M%S.%f")
    out = io.BytesIO()
    sr.save_as(out, enforce_file_format=True)
    return out.getvalue()


def sr_uid(prediction_id: str) -> str:
    """The SR's SOP Instance UID, made from its prediction's id (128 random bits, written as a
    UUID-derived UID under 2.25, PS3.5 B.2): an SR found in the PACS leads back to its audit
    record (GET /predictions/{id}, with id = the UID's number in hex), and the answer to one
    prediction is always the same object."""
    return f"2.25.{int(prediction_id, 16)}"


def derived_uid(purpose: str, name: str) -> str:
    """A UID under 2.25 made from a name (128 bits of its SHA-256): the same for the same name,
    so that an SR made again for one prediction carries the same UIDs."""
    digest = hashlib.sha256(f"pneumoscan {purpose} {name}".encode()).hexdigest()
    return f"2.25.{int(digest[:32], 16)}"


def prediction_id_of(sop_instance_uid: str) -> str | None:
    """sr_uid's inverse: the prediction id of a pneumoscan SR's SOP Instance UID, else None."""
    prefix, _, number = sop_instance_uid.partition("2.25.")
    if prefix or not (number.isascii() and number.isdigit()) or int(number) >= 1 << 128:
        return None
    return f"{int(number):032x}"


# pydicom has decoded the source's text to Unicode whatever its SpecificCharacterSet said, so the
# SR is written in UTF-8, which holds any of it exactly. Copying the source's value instead made
# the SR answer a 500 for an empty, unknown or lone ISO 2022 value (found by fuzzing, round 19).
SR_CHARSET = "ISO_IR 192"
SR_SOURCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def sr_problem(source) -> str | None:
    """Why no SR can be made in the source's study, or None: it must reference the source by
    one Study, Series and SOP Instance UID each, and a SOP class whose modules highdicom
    knows (to copy the patient and study). Checked before the model runs."""
    from pydicom.multival import MultiValue

    for keyword in SR_SOURCE_UIDS:
        value = source.get(keyword)
        # Digits and dots; leading zeros and over-long UIDs, which some archives hold, pass.
        if isinstance(value, MultiValue) or not re.fullmatch(r"[0-9.]+", str(value or "")):
            return f"its {keyword} is missing, multi-valued or not digits and dots"
    sop_class = str(source.get("SOPClassUID") or "")
    if sop_class not in _known_sop_classes():
        return f"its SOP class {sop_class[:64]!r} is not a standard storage class"
    return None


@functools.cache
def _known_sop_classes() -> frozenset[str]:
    try:  # the map highdicom copies the patient and study modules by
        from highdicom._standard_utils import get_sop_class_iod_map
    except ImportError:  # another highdicom layout: pydicom's list of SOP classes
        from pydicom.uid import UID_dictionary

        return frozenset(uid for uid, info in UID_dictionary.items() if info[1] == "SOP Class")
    return frozenset(get_sop_class_iod_map())


TYPE2_DEFAULTS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def _ood_measurements(record: PredictionRecord, threshold: float | None) -> list:
    """The out-of-distribution score and its flag threshold, when the model has them."""
    import highdicom as hd

    if record.ood_score is None or threshold is None:
        return []
    no_units = hd.sr.CodedConcept("1", "UCUM", "no units")
    return [
        hd.sr.Measurement(
            name=hd.sr.CodedConcept("OOD-SCORE", PRIVATE_SCHEME, "Out-of-distribution score"),
            value=round(record.ood_score, 4),
            unit=no_units,
        ),
        hd.sr.Measurement(
            name=hd.sr.CodedConcept("OOD-THRESHOLD", PRIVATE_SCHEME, "Out-of-distribution flag"),
            value=round(threshold, 4),
            unit=no_units,
        ),
    ]


def _age_evaluations(age: AgeCheck | None) -> list:
    """Whether the patient's age is within the model's trained ages, when it is known."""
    import highdicom as hd

    if age is None or age.status == "unknown":
        return []
    low, high = age.trained_age_years
    answer = ("373066001", "Yes") if age.status == "within" else ("373067005", "No")
    return [
        hd.sr.QualitativeEvaluation(
            # A code meaning fits a LO (64 characters).
            name=hd.sr.CodedConcept(
                "AGE-IN-TRAINING", PRIVATE_SCHEME, f"Age within trained ages {low}-{high} y"
            ),
            value=hd.sr.CodedConcept(answer[0], "SCT", answer[1]),
        )
    ]


def age_warning(age: AgeCheck | None) -> str | None:
    """The warning for a patient outside the model's trained ages, else None."""
    if age is None or age.status != "outside":
        return None
    low, high = age.trained_age_years
    return (
        f"Patient age outside the ages the model was trained on ({low}-{high} years): the "
        "probability comes from a population the model never saw."
    )


def _with_type2_attributes(source):
    """The source as the SR copies it, on a copy. The patient/study attributes the SR copies are
    Type 2 (present, possibly empty): some modalities omit them, and they are filled empty. Some
    write values highdicom refuses (a birth date as 1980-01-01, PatientSex "Female", a time
    25:99), which made the SR answer a 500 before round 19: those are emptied too. A one-part
    PatientName ("ANONYMOUS") gets its trailing caret ("ANONYMOUS^", the same name by PS3.5
    6.2.1.2), or highdicom would warn with the name in its message."""
    from copy import copy

    from pydicom.valuerep import DA, TM

    ds = copy(source)
    for keyword in TYPE2_DEFAULTS:
        if keyword not in ds:
            setattr(ds, keyword, "")
    for keyword, kind in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        try:
            kind(ds.get(keyword) or None)
        except (ValueError, TypeError, OverflowError):
            setattr(ds, keyword, "")
    if str(ds.get("PatientSex") or "").strip() not in ("", "M", "F", "O"):
        ds.PatientSex = ""
    name = str(ds.get("PatientName") or "")
    if name and "^" not in name:
        ds.PatientName = f"{name}^"
    return ds


def ood_warning(record: PredictionRecord, threshold: float | None) -> str | None:
    """The warning for an input flagged as unlike the training radiographs, else None."""
    if record.ood_score is None or threshold is None or record.ood_score <= threshold:
        return None
    return (
        f"Input flagged as unlike the training radiographs (out-of-distribution score "
        f"{record.ood_score:.1f} > {threshold:.1f}): the probability is unreliable."
    )


def build_fhir(
    record: PredictionRecord,
    model_name: str,
    model_version: int,
    ood_threshold: float | None = None,
    age: AgeCheck | None = None,
) -> dict:
    """FHIR R4 DiagnosticReport with the Observation and the model's Device contained."""
    finding_code, finding_meaning = FINDINGS[record.label]
    warnings = [w for w in (ood_warning(record, ood_threshold), age_warning(age)) if w]
    notes = [{"text": CAUTION}] + [{"text": warning} for warning in warnings]
    issued = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="seconds")
    identifiers = [{"system": "urn:pneumoscan:prediction", "value": record.id}]
    for uid in (record.study_uid, record.sop_uid):
        if uid:
            identifiers.append({"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"})
    device = {
        "resourceType": "Device",
        "id": "model",
        "manufacturer": "pneumoscan",
        "deviceName": [{"name": f"pneumoscan {model_name}", "type": "model-name"}],
        "version": [{"value": str(model_version)}],
        "note": [{"text": CAUTION}],
    }
    observation = {
        "resourceType": "Observation",
        "id": "result",
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "imaging",
                    }
                ]
            }
        ],
        "code": {
            "coding": [{"system": SNOMED, "code": "233604007", "display": "Pneumonia"}],
            "text": "Probability of pneumonia (AI screening)",
        },
        "effectiveDateTime": issued,
        "valueQuantity": {
            "value": round(record.p_pneumonia, 6),
            "unit": "probability",
            "system": "http://unitsofmeasure.org",
            "code": "1",
        },
        "interpretation": [
            {
                "coding": [{"system": SNOMED, "code": finding_code, "display": finding_meaning}],
                "text": f"{record.label} at threshold {record.threshold:.4f}",
            }
        ],
        "device": {"reference": "#model"},
        "note": notes,
    }
    return {
        "resourceType": "DiagnosticReport",
        "id": record.id,
        "identifier": identifiers,
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "RAD",
                        "display": "Radiology",
                    }
                ]
            }
        ],
        "code": {
            "coding": [
                {
                    "system": "http://loinc.org",
                    "code": "18748-4",
                    "display": "Diagnostic imaging study",
                }
            ],
            "text": "AI pneumonia screening of a chest radiograph",
        },
        "issued": issued,
        "performer": [{"display": f"pneumoscan {model_name} v{model_version}"}],
        "contained": [device, observation],
        "result": [{"reference": "#result"}],
        "conclusion": f"{record.label} (P(pneumonia) = {record.p_pneumonia:.3f}). "
        + "".join(f"{warning} " for warning in warnings)
        + CAUTION,
        "conclusionCode": [
            {"coding": [{"system": SNOMED, "code": finding_code, "display": finding_meaning}]}
        ],
    }
