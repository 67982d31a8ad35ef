"""Content negotiation for POST /predict: qualities, specificity, wildcards and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from app.negotiation import DICOM, FHIR, JSON, choose
from tests.conftest import FIXTURES
from tests.utils.dicom_factory import make_dicom

ALL = (JSON, FHIR, DICOM)


@pytest.mark.parametrize(
    ("accept", "offered", "expected"),
    [
        (None, ALL, JSON),
        ("", ALL, JSON),
        ("*/*", ALL, JSON),
        ("application/*", ALL, JSON),
        ("application/dicom", ALL, DICOM),
        ("Application/DICOM; transfer-syntax=*", ALL, DICOM),
        ("application/fhir+json", ALL, FHIR),
        ("application/fhir+json; fhirVersion=4.0", ALL, FHIR),
        ("application/fhir+json, application/dicom", ALL, FHIR),  # a tie: the earlier offered
        # Before (a substring test), each of these four gave an SR.
        ("application/json, application/dicom;q=0.1", ALL, JSON),
        ("application/dicom+json", ALL, None),
        ("application/dicom;q=0", ALL, None),
        ("application/dicom;q=0, */*", ALL, JSON),
        ("application/dicom;q=0.9, application/json;q=0.8", ALL, DICOM),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", ALL, JSON),
        ("application/*;q=0.5, application/fhir+json", ALL, FHIR),
        ("application/json;q=0, application/*", ALL, FHIR),
        ("text/csv", ALL, None),
        ("*/*;q=0", ALL, None),
        ("application/json;q=abc", ALL, JSON),  # an unreadable q: as if the header were absent
        # numbers float() reads but a q-value is not: the range is ignored, as an unreadable q
        ("application/dicom;q=nan, application/json;q=0.1", ALL, JSON),
        ("application/dicom;q=inf, application/json;q=0.1", ALL, JSON),
        ("application/dicom;q=1_0, application/json;q=0.1", ALL, JSON),
        ("application/dicom;q=\u0661, application/json;q=0.1", ALL, JSON),
        ("application/dicom;q=1.5, application/json;q=0.9", ALL, DICOM),  # read as 1
        ("application/dicom;q=.5, application/json;q=0.4", ALL, DICOM),
        (",,", ALL, JSON),
        ("application/dicom", (JSON, FHIR), None),
    ],
)
def test_choose(accept: str | None, offered: tuple[str, ...], expected: str | None) -> None:
    assert choose(accept, offered) == expected


def test_the_answer_follows_the_accept_header(client) -> None:
    gray = np.asarray(
        Image.open(FIXTURES / "chest_xray" / "NORMAL" / "NORMAL2-IM-0744-0001.jpeg").convert("L")
    )
    dicom = make_dicom(gray)

    def post(accept: str | None):
        headers = {} if accept is None else {"Accept": accept}
        return client.post("/predict", files={"file": ("a.dcm", dicom)}, headers=headers)

    preferred_json = post("application/json, application/dicom;q=0.1")
    assert preferred_json.headers["content-type"] == JSON
    assert post("application/dicom").headers["content-type"] == DICOM
    assert post("application/fhir+json").headers["content-type"] == FHIR
    count = client.app.state.services.records.count()
    for refused in ("text/csv", "application/dicom+json", "*/*;q=0"):
        response = post(refused)
        assert response.status_code == 406, (refused, response.text)
        assert response.json()["error"]["code"] == "not_acceptable"
        assert "application/json" in response.json()["error"]["message"]
    assert client.app.state.services.records.count() == count  # nothing recorded
