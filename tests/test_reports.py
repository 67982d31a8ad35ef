"""FHIR R4 DiagnosticReport and DICOM SR outputs of POST /predict."""

from __future__ import annotations

import io
import logging

import numpy as np
import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from app.reports import prediction_id_of, sr_uid
from tests.conftest import FIXTURES
from tests.utils.dicom_factory import PATIENT_ID, make_dicom


def gray_image() -> np.ndarray:
    return np.asarray(
        Image.open(FIXTURES / "chest_xray" / "PNEUMONIA" / "person495_bacteria_2094.jpeg").convert(
            "L"
        )
    )


def test_fhir_diagnostic_report_is_valid_r4(client) -> None:
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    dicom = make_dicom(gray_image(), bits=12, voi_lut=True)
    response = client.post(
        "/predict", files={"file": ("a.dcm", dicom)}, headers={"Accept": "application/fhir+json"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    report = DiagnosticReport.model_validate(body)
    assert report.status == "preliminary"
    kinds = {resource["resourceType"] for resource in body["contained"]}
    assert kinds == {"Device", "Observation"}
    observation = next(r for r in body["contained"] if r["resourceType"] == "Observation")
    assert 0 <= observation["valueQuantity"]["value"] <= 1
    assert observation["device"] == {"reference": "#model"}
    ds = pydicom.dcmread(io.BytesIO(dicom))
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{ds.StudyInstanceUID}"} in body[
        "identifier"
    ]
    assert "NOT FOR DIAGNOSTIC USE" in body["conclusion"]


def test_dicom_sr_in_the_same_study(client) -> None:
    dicom = make_dicom(gray_image(), bits=16)
    source = pydicom.dcmread(io.BytesIO(dicom))
    response = client.post(
        "/predict", files={"file": ("a.dcm", dicom)}, headers={"Accept": "application/dicom"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    assert "x-input-check" not in response.headers  # the tiny model has no such score
    sr = pydicom.dcmread(io.BytesIO(response.content))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.PatientID == PATIENT_ID  # copied into the SR for the PACS, never logged
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    equipment = sr.ContributingEquipmentSequence[0]
    assert equipment.Manufacturer == "pneumoscan"
    assert "pneumonia v1" in equipment.ManufacturerModelName
    assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
    text = str(sr)
    assert response.headers["x-label"] in ("NORMAL", "PNEUMONIA")
    expected = "Pneumonia" if response.headers["x-label"] == "PNEUMONIA" else "Normal"
    assert expected in text and "Probability of pneumonia" in text
    # the SR leads back to its audit record: its UID is the prediction id, and says so
    prediction_id = response.headers["x-prediction-id"]
    assert prediction_id_of(sr.SOPInstanceUID) == prediction_id
    assert len(sr.SOPInstanceUID) <= 64 and pydicom.uid.UID(sr.SOPInstanceUID).is_valid
    texts = []
    sr.walk(lambda _, element: texts.append(element.value) if element.keyword == "TextValue" else 0)
    assert f"pneumoscan prediction {prediction_id}" in texts  # the tracking identifier
    assert (
        client.get(f"/predictions/{prediction_id}").json()["label"] == (response.headers["x-label"])
    )


@given(st.integers(min_value=0, max_value=(1 << 128) - 1))
def test_sr_uids_and_prediction_ids_map_one_to_one(number: int) -> None:
    prediction_id = f"{number:032x}"
    uid = sr_uid(prediction_id)
    assert len(uid) <= 64 and pydicom.uid.UID(uid).is_valid
    assert prediction_id_of(uid) == prediction_id


@pytest.mark.parametrize(
    "uid", ["1.2.3", "2.25.", "2.25.x", "1.2.25.5", f"2.25.{1 << 128}", "2.25.\u00b2", "2.25.1.2"]
)
def test_other_uids_name_no_prediction(uid: str) -> None:
    assert prediction_id_of(uid) is None


def test_sr_for_a_jpeg_is_not_acceptable(client) -> None:
    jpeg = (FIXTURES / "chest_xray" / "NORMAL" / "NORMAL2-IM-0744-0001.jpeg").read_bytes()
    response = client.post(
        "/predict", files={"file": ("a.jpeg", jpeg)}, headers={"Accept": "application/dicom"}
    )
    assert response.status_code == 406
    assert response.json()["error"]["code"] == "not_acceptable"
    # refused before the model ran: nothing was recorded for an answer never delivered
    assert client.app.state.services.records.count() == 0


@pytest.mark.parametrize(
    "accept", ["application/json", "application/fhir+json", "application/dicom"]
)
def test_every_answer_type_logs_the_prediction(client, caplog, accept: str) -> None:
    """A PACS integration asks for the SR: its predictions belong in the log like JSON ones."""
    caplog.set_level(logging.INFO, logger="pneumoscan")
    response = client.post(
        "/predict",
        files={"file": ("a.dcm", make_dicom(gray_image(), bits=12))},
        headers={"Accept": accept},
    )
    assert response.status_code == 200, response.text
    logged = [r for r in caplog.records if r.getMessage() == "prediction"]
    assert len(logged) == 1
    assert logged[0].answer == accept
    assert logged[0].prediction_id == (
        response.json()["prediction_id"]
        if accept == "application/json"
        else response.headers["x-prediction-id"]
    )
    assert logged[0].label in ("NORMAL", "PNEUMONIA")


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        ("ISO_IR 100", "Müller^Jürgen"),  # Latin-1 in the source
        ("ISO_IR 192", "Ünïcødé^名前"),
        (None, "Doe^Jane"),
        ("", "Doe^Jane"),  # an empty value, which highdicom refused (500 before round 19)
        ("FOO", "Doe^Jane"),  # unknown
        ("ISO 2022 IR 87", "Doe^Jane"),  # a code extension alone
    ],
)
def test_the_sr_is_written_in_utf8_whatever_the_sources_character_set(
    client, charset: str | None, name: str
) -> None:
    import warnings

    attributes = {"PatientName": name}
    if charset is not None:
        attributes["SpecificCharacterSet"] = charset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the unknown values
        dicom = make_dicom(gray_image(), attributes=attributes)
    response = client.post(
        "/predict", files={"file": ("a.dcm", dicom)}, headers={"Accept": "application/dicom"}
    )
    assert response.status_code == 200, response.text
    sr = pydicom.dcmread(io.BytesIO(response.content))
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert str(sr.PatientName) == name  # the same text, whatever it was encoded in


@pytest.mark.parametrize(
    "attributes",
    [
        {"StudyInstanceUID": "1.2.3\\1.2.4"},  # multi-valued: a 500 before round 19
        {"SOPInstanceUID": ""},
        {"SeriesInstanceUID": "1.2.abc"},
        {"SOPClassUID": "1.2.3.4.5.6"},  # a private SOP class: highdicom cannot copy from it
    ],
)
def test_an_sr_that_cannot_reference_its_source_is_refused_before_the_model(
    client, attributes: dict
) -> None:
    dicom = make_dicom(gray_image(), attributes=attributes)
    response = client.post(
        "/predict", files={"file": ("a.dcm", dicom)}, headers={"Accept": "application/dicom"}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "unsupported_dicom" and "application/json" in error["message"]
    assert client.app.state.services.records.count() == 0  # nothing recorded for it
    # The same object is scored when a JSON answer is asked for.
    assert client.post("/predict", files={"file": ("a.dcm", dicom)}).status_code == 200


def test_leading_zeros_in_a_uid_do_not_stop_the_sr(client) -> None:
    """Some archives hold UIDs with leading zeros in a component or over 64 characters, which
    the standard forbids; the SR still references them as they are."""
    uid = "1.2.840.0123." + "9" * 60
    dicom = make_dicom(gray_image(), attributes={"StudyInstanceUID": uid})
    response = client.post(
        "/predict", files={"file": ("a.dcm", dicom)}, headers={"Accept": "application/dicom"}
    )
    assert response.status_code == 200, response.text
    assert pydicom.dcmread(io.BytesIO(response.content)).StudyInstanceUID == uid


HOSTILE_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyDate",
    "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID", "SeriesNumber",
    "InstanceNumber", "Modality", "BodyPartExamined", "ViewPosition", "SpecificCharacterSet",
    "ContentDate", "SeriesDate", "ImageLaterality", "SOPClassUID", "StudyInstanceUID",
    "SeriesInstanceUID", "SOPInstanceUID", "WindowCenter", "WindowWidth", "RescaleSlope",
    "PresentationIntentType", "OtherPatientIDs", "IssuerOfPatientID", "ImageType",
)  # fmt: skip
HOSTILE_VALUES = (
    "", " ", "A\\B\\C", "x" * 300, "\x00", "Ünï名", "-1", "1e400", "NaN", "20251399", "25:99",
    "1.2.3", "ISO_IR 100", "999Y", "3.5", "\\", "^", "=^=", "ISO 2022 IR 87",
)  # fmt: skip


def test_hostile_header_values_get_an_answer_or_a_4xx_never_a_5xx(client) -> None:
    """A seeded sample of non-conformant values in the attributes the service and its SR read,
    sent for each answer type (round 19 found 500s this way on the SR path)."""
    import random
    import warnings

    from pydicom import config

    base = (FIXTURES / "dicom" / "person1946_bacteria_4874.dcm").read_bytes()
    rng = random.Random(19)
    statuses, sent = [], 0
    for _ in range(25):
        ds = pydicom.dcmread(io.BytesIO(base))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config.settings.writing_validation_mode = config.IGNORE
            try:
                for _ in range(rng.randint(1, 4)):
                    try:
                        setattr(ds, rng.choice(HOSTILE_KEYWORDS), rng.choice(HOSTILE_VALUES))
                    except (ValueError, TypeError, OverflowError):
                        continue  # pydicom refuses it outright (a number as '^')
                out = io.BytesIO()
                ds.save_as(out, enforce_file_format=True)
            except (ValueError, TypeError, UnicodeError):
                continue  # not even writable ("名" in a Latin-1 object): no PACS sends it
            finally:
                config.settings.writing_validation_mode = config.WARN
        sent += 1
        for accept in ("application/json", "application/fhir+json", "application/dicom"):
            response = client.post(
                "/predict", files={"file": ("a.dcm", out.getvalue())}, headers={"Accept": accept}
            )
            statuses.append(response.status_code)
            assert response.status_code in (200, 422), (accept, response.text[:300])
            if response.status_code == 200 and accept == "application/dicom":
                pydicom.dcmread(io.BytesIO(response.content))  # a readable SR
    assert sent >= 15  # most samples could be written and were sent
    assert statuses.count(200) > len(statuses) / 2  # most are still scored


def test_a_multi_valued_uid_is_not_echoed_as_a_list(client) -> None:
    """A non-conformant multi-valued StudyInstanceUID is left out of the JSON answer's UIDs
    (before round 19 it came back as the text of a Python list); the single-valued ones stay."""
    dicom = make_dicom(gray_image(), attributes={"StudyInstanceUID": "1.2.3\\1.2.4"})
    source = pydicom.dcmread(io.BytesIO(dicom))
    response = client.post("/predict", files={"file": ("a.dcm", dicom)})
    assert response.status_code == 200, response.text
    echoed = response.json()["dicom"]
    assert echoed["study_instance_uid"] is None
    assert echoed["sop_instance_uid"] == source.SOPInstanceUID
