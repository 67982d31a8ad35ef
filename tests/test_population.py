"""The patient's age against the model's trained ages: parsing, the answer, the audit trail,
FHIR and SR, the refuse policy, and that the age itself never leaves the service."""

from __future__ import annotations

import io
import logging
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset

from app.errors import ModelStoreError
from app.population import (
    AgeRange,
    PatientAge,
    age_from_age_string,
    age_status,
    completed_years,
    patient_age,
)
from tests.conftest import API_KEY, FIXTURES, build_tiny_model, make_settings, tiny_card
from tests.utils.dicom_factory import make_dicom


def gray_image() -> np.ndarray:
    path = FIXTURES / "chest_xray" / "NORMAL" / "NORMAL2-IM-0744-0001.jpeg"
    return np.asarray(Image.open(path).convert("L"))


def dicom_with(**attributes: object) -> bytes:
    return make_dicom(gray_image(), bits=12, attributes=attributes)


def dataset(**attributes: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("text", "years"),
    [
        ("003Y", 3),
        ("045Y", 45),
        ("011M", 0),
        ("012M", 1),
        ("071M", 5),
        ("072M", 6),
        ("052W", 0),
        ("053W", 1),  # 371 days
        ("364D", 0),
        ("366D", 1),
        (" 005y ", 5),
        ("", None),
        ("5Y", None),  # the VR is exactly three digits and a unit
        ("005", None),
        ("0005Y", None),
        ("abcY", None),
        ("\u0660\u0660\u0665Y", None),  # Arabic-Indic digits: not the VR's
        (None, None),
    ],
)
def test_age_strings(text: object, years: int | None) -> None:
    assert age_from_age_string(text) == years


def test_age_from_birth_date_counts_completed_years() -> None:
    assert completed_years(date(2020, 6, 15), date(2025, 6, 14)) == 4
    assert completed_years(date(2020, 6, 15), date(2025, 6, 15)) == 5
    assert completed_years(date(2020, 2, 29), date(2021, 2, 28)) == 0
    age = patient_age(dataset(PatientBirthDate="19800101", StudyDate="20250101"))
    assert age == PatientAge(45, "PatientBirthDate")
    # PatientAge is the age at the study and wins over the dates
    both = dataset(PatientAge="004Y", PatientBirthDate="19800101", StudyDate="20250101")
    assert patient_age(both) == PatientAge(4, "PatientAge")
    # without a study date, the series, acquisition or content date stands in
    assert patient_age(dataset(PatientBirthDate="20200101", ContentDate="20230601")) == (
        PatientAge(3, "PatientBirthDate")
    )


@pytest.mark.parametrize(
    "attributes",
    [
        {},
        {"PatientAge": ""},
        {"PatientAge": "999Y"},  # a placeholder, not an age
        {"PatientBirthDate": "19800101"},  # no date to measure against
        {"PatientBirthDate": "20300101", "StudyDate": "20250101"},  # born after the study
        {"PatientBirthDate": "20230231", "StudyDate": "20250101"},  # no such day
        {"PatientBirthDate": "unknown", "StudyDate": "20250101"},
        {
            "PatientBirthDate": "\uff12\uff10\uff12\uff10\uff10\uff11\uff10\uff11",
            "StudyDate": "20250101",
        },
    ],
)
def test_unreadable_or_impossible_ages_are_unknown(attributes: dict) -> None:
    assert patient_age(dataset(**attributes)) is None
    assert age_status(patient_age(dataset(**attributes)), AgeRange(1, 5)) == "unknown"


@given(age=st.text(max_size=12), birth=st.text(max_size=12), study=st.text(max_size=12))
def test_any_text_gives_an_age_or_unknown(age: str, birth: str, study: str) -> None:
    """Hostile values never raise: the age is plausible or unknown."""
    ds = Dataset()
    for keyword, value in (("PatientAge", age), ("PatientBirthDate", birth), ("StudyDate", study)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about values that break the VR
            try:
                setattr(ds, keyword, value)
            except (ValueError, TypeError):  # and refuses some outright
                continue
    found = patient_age(ds)
    assert found is None or 0 <= found.years <= 130


def test_the_age_never_shows_in_a_repr() -> None:
    assert "45" not in repr(PatientAge(45, "PatientAge"))


@pytest.mark.parametrize("text", ["5-1", "1-", "a-b", "1-500", "-1-5", "1..5"])
def test_bad_age_ranges(text: str) -> None:
    with pytest.raises(ValueError):
        AgeRange.parse(text)
    assert AgeRange.parse(" 1 - 5 ") == AgeRange(1, 5)


def content_items(ds: Dataset) -> list[Dataset]:
    """Every SR content item under `ds`, depth first."""
    items = []
    for item in ds.get("ContentSequence", []):
        items += [item, *content_items(item)]
    return items


def predict(client, data: bytes, **headers: str):
    response = client.post("/predict", files={"file": ("a.dcm", data)}, headers=headers)
    assert response.status_code == 200, response.text
    return response


@pytest.mark.parametrize(
    ("attributes", "status", "source"),
    [
        ({"PatientAge": "003Y"}, "within", "PatientAge"),
        ({"PatientAge": "045Y"}, "outside", "PatientAge"),
        ({"PatientAge": "006M"}, "outside", "PatientAge"),  # an infant: younger than the cohort
        ({"PatientBirthDate": "19700315", "StudyDate": "20250101"}, "outside", "PatientBirthDate"),
        ({"PatientBirthDate": "20210315", "StudyDate": "20250101"}, "within", "PatientBirthDate"),
        ({}, "unknown", None),
    ],
)
def test_answer_and_audit_carry_the_verdict_not_the_age(
    client, caplog, attributes: dict, status: str, source: str | None
) -> None:
    caplog.set_level(logging.DEBUG, logger="pneumoscan")
    body = predict(client, dicom_with(**attributes)).json()
    assert body["age_check"] == {"status": status, "trained_age_years": [1, 5], "source": source}
    stored = client.get(f"/predictions/{body['prediction_id']}").json()
    assert stored["age_check"] == status
    metrics = client.get("/metrics").text
    assert f'pneumoscan_age_checks_total{{model_version="1",status="{status}"}} 1.0' in metrics
    logged = [r for r in caplog.records if r.getMessage() == "prediction"]
    assert [r.age_check for r in logged] == [status]
    for value in attributes.values():  # no age or birth date in any answer or log record
        assert value not in str(body) and value not in str(stored)
        assert all(value not in str(vars(r)) for r in caplog.records)


def test_a_jpeg_has_no_age(client) -> None:
    jpeg = (FIXTURES / "originals" / "NORMAL2-IM-0744-0001.jpeg").read_bytes()
    response = client.post("/predict", files={"file": ("a.jpeg", jpeg)})
    assert response.json()["age_check"] == {
        "status": "unknown",
        "trained_age_years": [1, 5],
        "source": None,
    }


JPEG = (FIXTURES / "originals" / "NORMAL2-IM-0744-0001.jpeg").read_bytes()


@pytest.mark.parametrize(
    ("header", "status"),
    [("003Y", "within"), ("047Y", "outside"), ("030M", "within"), ("010W", "outside")],
)
def test_a_jpegs_age_can_come_with_the_request(client, caplog, header: str, status: str) -> None:
    """A RIS that posts a JPEG or PNG knows the age; X-Patient-Age (a DICOM Age String) gives
    it to the check. Only the verdict is answered, stored and logged."""
    caplog.set_level(logging.DEBUG)
    response = client.post(
        "/predict", files={"file": ("a.jpeg", JPEG)}, headers={"X-Patient-Age": header}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["age_check"] == {
        "status": status,
        "trained_age_years": [1, 5],
        "source": "X-Patient-Age",
    }
    stored = client.get(f"/predictions/{body['prediction_id']}").json()
    assert stored["age_check"] == status
    assert header not in response.text and header not in str(stored)
    assert all(header not in str(vars(r)) and header not in r.getMessage() for r in caplog.records)
    # the same image as the body, and as FHIR
    fhir = client.post(
        "/predict",
        content=JPEG,
        headers={
            "Content-Type": "image/jpeg",
            "X-Patient-Age": header,
            "Accept": "application/fhir+json",
        },
    ).json()
    assert ("outside the ages the model was trained on" in fhir["conclusion"]) == (
        status == "outside"
    )


def test_a_dicoms_own_age_comes_before_the_header(client) -> None:
    child = dicom_with(PatientAge="003Y")
    body = predict(client, child, **{"X-Patient-Age": "047Y"}).json()
    assert body["age_check"]["status"] == "within"
    assert body["age_check"]["source"] == "PatientAge"
    # a DICOM without a readable age takes the header's
    body = predict(client, dicom_with(), **{"X-Patient-Age": "047Y"}).json()
    assert body["age_check"]["status"] == "outside"
    assert body["age_check"]["source"] == "X-Patient-Age"


@pytest.mark.parametrize("header", ["47", "47Y", "047X", "999Y", "\u0664\u0667Y", "-47Y", "0 47Y"])
def test_a_malformed_age_header_is_refused_before_the_upload_is_read(client, header: str) -> None:
    before = client.app.state.services.records.count()
    response = client.post(
        "/predict",
        files={"file": ("a.jpeg", JPEG)},
        headers={"X-Patient-Age": header.encode("utf-8")},  # as a client would send it
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_patient_age"
    assert "DICOM Age String" in error["message"] and "47" not in error["message"]
    assert client.app.state.services.records.count() == before


def test_two_age_headers_are_refused(client) -> None:
    response = client.post(
        "/predict",
        files={"file": ("a.jpeg", JPEG)},
        headers=[("X-Patient-Age", "003Y"), ("X-Patient-Age", "047Y")],
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_patient_age"
    assert "once" in response.json()["error"]["message"]


def test_fhir_and_sr_warn_for_a_patient_outside_the_trained_ages(client) -> None:
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    adult, child = dicom_with(PatientAge="045Y"), dicom_with(PatientAge="003Y")
    fhir = predict(client, adult, Accept="application/fhir+json").json()
    DiagnosticReport.model_validate(fhir)  # still valid R4 with the extra note
    assert "outside the ages the model was trained on (1-5 years)" in fhir["conclusion"]
    assert any("outside the ages" in note["text"] for note in fhir["contained"][1]["note"])
    fhir_child = predict(client, child, Accept="application/fhir+json").json()
    assert "outside the ages" not in fhir_child["conclusion"]

    for data, answer in ((adult, "No"), (child, "Yes")):
        response = predict(client, data, Accept="application/dicom")
        assert response.headers["x-age-check"] == ("outside" if answer == "No" else "within")
        sr = pydicom.dcmread(io.BytesIO(response.content))
        evaluations = [
            item
            for item in content_items(sr)
            if item.get("ValueType") == "CODE"
            and item.ConceptNameCodeSequence[0].CodeValue == "AGE-IN-TRAINING"
        ]
        assert len(evaluations) == 1
        assert evaluations[0].ConceptCodeSequence[0].CodeMeaning == answer
        assert "045Y" not in str(sr.ContentSequence)  # the SR states the verdict, not the age


def test_refuse_policy(tiny_store: Path, tmp_path: Path) -> None:
    settings = make_settings(tiny_store, tmp_path / "data", age_outside="refuse")
    with TestClient(__import__("app.main").main.create_app(settings)) as client:
        client.headers["X-API-Key"] = API_KEY
        response = client.post("/predict", files={"file": ("a.dcm", dicom_with(PatientAge="045Y"))})
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "age_outside_training"
        assert "1-5 years" in error["message"] and "045" not in error["message"]
        assert client.app.state.services.records.count() == 0  # refused before the model
        assert 'pneumoscan_rejected_total{reason="age_outside_training"} 1.0' in (
            client.get("/metrics").text
        )
        # within the ages, or unknown (JPEG, DICOM without an age), is scored as always
        assert predict(client, dicom_with(PatientAge="002Y")).json()["age_check"]["status"] == (
            "within"
        )
        assert predict(client, dicom_with()).json()["age_check"]["status"] == "unknown"
        # a JPEG whose age comes with the request is refused the same way
        adult = client.post(
            "/predict", files={"file": ("a.jpeg", JPEG)}, headers={"X-Patient-Age": "045Y"}
        )
        assert adult.status_code == 422
        assert adult.json()["error"]["code"] == "age_outside_training"
        assert "X-Patient-Age" in adult.json()["error"]["message"]
        assert "045" not in adult.json()["error"]["message"]


def test_the_check_can_be_turned_off(tiny_store: Path, tmp_path: Path) -> None:
    settings = make_settings(tiny_store, tmp_path / "data", trained_age_years="off")
    with TestClient(__import__("app.main").main.create_app(settings)) as client:
        client.headers["X-API-Key"] = API_KEY
        body = predict(client, dicom_with(PatientAge="045Y")).json()
        assert body["age_check"] is None
        assert client.get(f"/predictions/{body['prediction_id']}").json()["age_check"] is None


def test_the_model_cards_ages_win_over_the_setting(tmp_path: Path) -> None:
    """A version trained on adults says so in its card; the setting is for cards without."""
    from training.export import export_version

    card = tiny_card(population={"age_years": [18, 99]})
    export_version(tmp_path / "store" / "pneumonia", build_tiny_model(), 1.0, card)
    settings = make_settings(tmp_path / "store", tmp_path / "data")
    with TestClient(__import__("app.main").main.create_app(settings)) as client:
        client.headers["X-API-Key"] = API_KEY
        adult = predict(client, dicom_with(PatientAge="045Y")).json()["age_check"]
        assert adult == {"status": "within", "trained_age_years": [18, 99], "source": "PatientAge"}
        child = predict(client, dicom_with(PatientAge="003Y")).json()["age_check"]
        assert child["status"] == "outside"


@pytest.mark.parametrize(
    "population", [{"age_years": [5, 1]}, {"age_years": "1-5"}, {"age_years": [1.5, 5]}, "kids"]
)
def test_a_malformed_card_population_is_not_servable(tmp_path: Path, population: object) -> None:
    from app.classifier import load_version
    from training.export import export_version

    model_dir = tmp_path / "pneumonia"
    export_version(model_dir, build_tiny_model(), 1.0, tiny_card(population=population))
    with pytest.raises(ModelStoreError, match="population"):
        load_version(model_dir, 1)


def test_a_database_from_before_the_age_check_gains_the_column(tmp_path: Path) -> None:
    """Rows written before the column existed read back with age_check null."""
    import sqlite3

    from app.records import RecordStore

    data = tmp_path / "data"
    data.mkdir()
    db = sqlite3.connect(data / "pneumoscan.sqlite3")
    db.execute(
        "CREATE TABLE predictions (id TEXT PRIMARY KEY, created REAL NOT NULL, key_id TEXT NOT "
        "NULL, model_name TEXT NOT NULL, model_version INTEGER NOT NULL, p_normal REAL NOT "
        "NULL, p_pneumonia REAL NOT NULL, label TEXT NOT NULL, threshold REAL NOT NULL, "
        "image_sha256 TEXT NOT NULL, input_format TEXT NOT NULL, input_bytes INTEGER NOT NULL, "
        "width INTEGER NOT NULL, height INTEGER NOT NULL, study_uid TEXT, series_uid TEXT, "
        "sop_uid TEXT)"
    )
    db.execute(
        "INSERT INTO predictions VALUES ('a', 1.0, 'k', 'pneumonia', 1, 0.5, 0.5, 'NORMAL', 0.5, "
        "'00', 'JPEG', 1, 224, 224, NULL, NULL, NULL)"
    )
    db.commit()
    db.close()
    store = RecordStore(data, 3600)
    try:
        record = store.get("a")
        assert record is not None and record.age_check is None and record.ood_score is None
    finally:
        store.close()
