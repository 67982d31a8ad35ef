"""Security: no patient data or file names in logs, key ids only, headers, CORS off, and
every answered prediction survives a kill -9."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image

from app.security import KeyRing, key_id
from tests.conftest import API_KEY, FIXTURES
from tests.utils.dicom_factory import PATIENT_ID, PATIENT_NAME, make_dicom


def test_logs_never_carry_patient_tags_file_names_or_keys(client, caplog) -> None:
    gray = np.asarray(
        Image.open(FIXTURES / "chest_xray" / "NORMAL" / "NORMAL2-IM-0744-0001.jpeg").convert("L")
    )
    caplog.set_level(logging.DEBUG)
    secret_name = "Smith^John-private-filename.dcm"
    response = client.post("/predict", files={"file": (secret_name, make_dicom(gray))})
    assert response.status_code == 200
    client.post("/predict", files={"file": (secret_name, b"\x00" * 128 + b"DICM" + b"junk")})
    text = "\n".join(record.getMessage() + str(record.__dict__) for record in caplog.records)
    assert caplog.records, "expected log records to scan"
    for forbidden in (PATIENT_NAME, "Doe", PATIENT_ID, secret_name, "Smith", API_KEY):
        assert forbidden not in text
    assert key_id(API_KEY) in text


def test_key_ring_compares_every_key_and_returns_ids() -> None:
    ring = KeyRing(("a" * 20, "b" * 20))
    assert ring.identify("b" * 20) == key_id("b" * 20)
    assert ring.identify("c" * 20) is None and ring.identify(None) is None
    assert re.fullmatch(r"key-[0-9a-f]{12}", key_id("a" * 20))


def test_security_headers_and_no_cors(client) -> None:
    response = client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["cache-control"] == "no-store"
    assert "strict-transport-security" not in response.headers  # plain HTTP: no HSTS
    assert "access-control-allow-origin" not in response.headers
    preflight = client.options(
        "/predict",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_prediction_ids_are_random_128_bit(client) -> None:
    image = (FIXTURES / "chest_xray" / "NORMAL" / "NORMAL2-IM-0744-0001.jpeg").read_bytes()
    ids = {
        client.post("/predict", files={"file": ("a.jpeg", image)}).json()["prediction_id"]
        for _ in range(5)
    }
    assert len(ids) == 5 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_kill_9_during_writes_loses_no_answered_prediction_and_retries_record_none_twice(
    tiny_store: Path,
) -> None:
    from benchmarks.kill_during_writes import run

    result = run(clients=4, kill_after=2.0, store=tiny_store)
    assert result["answered_200"] > 0
    assert result["missing"] == 0 and result["mismatched"] == 0
    assert result["integrity"] == "ok" and result["explain_after_restart"] == 200
    # the requests the kill left unanswered, retried with their Idempotency-Keys: those
    # recorded before it are replayed, the others scored, and no image is recorded twice
    assert result["unanswered_at_kill"] == result["retries_replayed"] + result["retries_scored"]
    assert result["retries_replayed"] == result["rows_after_restart"] - result["answered_200"]
    assert result["recorded_twice"] == 0 and result["passed"]


def test_a_logged_exception_says_where_it_happened_but_not_its_message() -> None:
    """An exception's text can quote an upload (a DICOM tag, a file name); its frames cannot."""
    import json
    import sys

    from app.observability import JsonFormatter

    def decode_tags() -> None:
        raise ValueError(f"bad value {PATIENT_NAME!r}")

    try:
        decode_tags()
    except ValueError:
        record = logging.LogRecord("pneumoscan", logging.ERROR, __file__, 1, "failed", (), None)
        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["exc_type"] == "ValueError"
    assert (
        entry["exc_where"][-1].startswith("test_security.py:")
        and "decode_tags" in (entry["exc_where"][-1])
    )
    assert PATIENT_NAME not in json.dumps(entry)


def test_library_messages_that_can_quote_dicom_attributes_are_withheld() -> None:
    """pydicom logs "Invalid value for VR DA: '<value>'", highdicom warned with a patient's
    name, and a captured warning quotes whatever its library said: the log keeps the logger,
    the kind and the source line, never the text. The service's own messages are kept."""
    import json
    import warnings

    from app.observability import JsonFormatter

    formatter = JsonFormatter()
    warning = warnings.formatwarning(
        f'The string "{PATIENT_NAME}" is unlikely to represent the intended person name',
        UserWarning,
        "/venv/site-packages/highdicom/base.py",
        199,
    )
    records = {
        "py.warnings": logging.LogRecord(
            "py.warnings", logging.WARNING, "/py/warnings.py", 1, "%s", (warning,), None
        ),
        "pydicom": logging.LogRecord(
            "pydicom",
            logging.WARNING,
            "/venv/pydicom/valuerep.py",
            440,
            f"Invalid value for VR PN: '{PATIENT_NAME}'",
            (),
            None,
        ),
    }
    py_warning = json.loads(formatter.format(records["py.warnings"]))
    assert PATIENT_NAME not in json.dumps(py_warning)
    assert "base.py:199" in py_warning["msg"] and "UserWarning" in py_warning["msg"]
    logged = json.loads(formatter.format(records["pydicom"]))
    assert PATIENT_NAME not in json.dumps(logged) and "valuerep.py:440" in logged["msg"]
    own = logging.LogRecord(
        "pneumoscan.model", logging.INFO, __file__, 1, "serving v%d", (3,), None
    )
    assert json.loads(formatter.format(own))["msg"] == "serving v3"
