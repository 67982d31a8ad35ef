"""Idempotency-Key on POST /predict: a retried request gets its first prediction again, in any
representation, instead of a second prediction of the same image (app/idempotency.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.idempotency import key_digest
from app.records import RecordStore, audit_database
from tests.conftest import API_KEY, FIXTURES, OTHER_KEY, make_settings
from tests.utils.dicom_factory import make_dicom


def predictions_in(client: TestClient) -> int:
    return client.app.state.services.records.count()


def post(client: TestClient, image: bytes, key: str | None, **headers: str):
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post("/predict", files={"file": ("x", image)}, headers=headers)


def test_a_retry_with_the_key_gets_the_first_prediction_again(client, normal_jpeg) -> None:
    key = str(uuid.uuid4())
    first = post(client, normal_jpeg, key)
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers
    again = post(client, normal_jpeg, key)
    assert again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true"
    before, after = first.json(), again.json()
    assert after["prediction_id"] == before["prediction_id"]
    for field in ("label", "probabilities", "threshold", "model", "explain_url", "input"):
        assert after[field] == before[field], field
    assert after["timings"]["batch_size"] == 0  # no model call
    assert predictions_in(client) == 1
    # the draft's Structured Field form of the same key is the same key
    quoted = post(client, normal_jpeg, f'"{key}"')
    assert quoted.json()["prediction_id"] == before["prediction_id"]
    # and the replayed prediction is the one the audit trail and /explain know
    looked_up = client.get(f"/predictions/{before['prediction_id']}")
    assert looked_up.json()["probabilities"] == before["probabilities"]
    assert predictions_in(client) == 1


def test_without_a_key_or_with_a_new_one_each_post_is_a_new_prediction(client, normal_jpeg) -> None:
    ids = {post(client, normal_jpeg, None).json()["prediction_id"] for _ in range(2)}
    ids |= {post(client, normal_jpeg, str(uuid.uuid4())).json()["prediction_id"] for _ in range(2)}
    assert len(ids) == 4
    assert predictions_in(client) == 4


def test_the_key_with_another_image_is_refused(client, normal_jpeg, pneumonia_jpeg) -> None:
    key = str(uuid.uuid4())
    assert post(client, normal_jpeg, key).status_code == 200
    reused = post(client, pneumonia_jpeg, key)
    assert reused.status_code == 422
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    assert key not in reused.text
    assert predictions_in(client) == 1


def test_keys_belong_to_the_api_key_that_sent_them(client, normal_jpeg) -> None:
    key = str(uuid.uuid4())
    mine = post(client, normal_jpeg, key).json()["prediction_id"]
    theirs = post(client, normal_jpeg, key, **{"X-API-Key": OTHER_KEY})
    assert theirs.status_code == 200
    assert "idempotent-replayed" not in theirs.headers
    assert theirs.json()["prediction_id"] != mine  # never another caller's prediction
    assert predictions_in(client) == 2


@pytest.mark.parametrize(
    "value",
    ["", "  ", "a" * 256, "two words", "caf\u00e9", "tab\there", '"', '""'],
    ids=["empty", "blank", "too-long", "space", "non-ascii", "tab", "lone-quote", "empty-quoted"],
)
def test_a_malformed_key_is_refused_before_the_upload(client, normal_jpeg, value: str) -> None:
    response = client.post(
        "/predict",
        files={"file": ("x", normal_jpeg)},
        headers=[("Idempotency-Key", value.encode("utf-8"))],
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_idempotency_key"
    assert predictions_in(client) == 0


def test_a_key_sent_twice_is_refused(client, normal_jpeg) -> None:
    response = client.post(
        "/predict",
        files={"file": ("x", normal_jpeg)},
        headers=[("Idempotency-Key", "one-0001"), ("Idempotency-Key", "one-0001")],
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_idempotency_key"


def test_a_dicom_retry_gets_the_same_sr_and_the_same_fhir_report(client) -> None:
    source = FIXTURES / "chest_xray" / "PNEUMONIA" / "person495_bacteria_2094.jpeg"
    gray = np.asarray(Image.open(source).convert("L"))
    dicom = make_dicom(gray, bits=12)
    key = str(uuid.uuid4())
    sr = {"Accept": "application/dicom"}
    first = post(client, dicom, key, **sr)
    assert first.status_code == 200, first.text
    time.sleep(1.1)  # a clock-dated SR would now differ
    again = post(client, dicom, key, **sr)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    # byte for byte: the PACS that stored the first gets the same instance, not a second one
    assert again.content == first.content
    assert again.headers["x-prediction-id"] == first.headers["x-prediction-id"]
    assert again.headers["x-label"] == first.headers["x-label"]
    assert again.headers.get("x-age-check") == first.headers.get("x-age-check")
    stored = pydicom.dcmread(io.BytesIO(first.content))
    assert stored.SeriesInstanceUID.startswith("2.25.")
    fhir = post(client, dicom, key, Accept="application/fhir+json")
    assert fhir.status_code == 200 and fhir.headers["idempotent-replayed"] == "true"
    assert fhir.headers["x-prediction-id"] == first.headers["x-prediction-id"]
    assert predictions_in(client) == 1


@contextlib.contextmanager
def first_request_held(client: TestClient, image: bytes, key: str) -> Iterator[dict]:
    """POST `image` with `key` from a thread and hold it in `client`'s model queue until the
    block ends; the yielded dict then holds its response as 'first'."""
    services = client.app.state.services
    release, entered = threading.Event(), threading.Event()
    predict = services.batcher.predict

    async def slow_predict(pixels):
        entered.set()
        await asyncio.to_thread(release.wait, 10)
        return await predict(pixels)

    services.batcher.predict = slow_predict
    results: dict[str, object] = {}
    first = threading.Thread(target=lambda: results.update(first=post(client, image, key)))
    first.start()
    try:
        assert entered.wait(10)
        yield results
    finally:
        release.set()
        first.join(10)
        services.batcher.predict = predict


def assert_in_use(response) -> None:
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "idempotency_key_in_use"
    assert response.headers["retry-after"] == "1"


def test_a_retry_while_the_first_is_scored_waits_for_it(client, normal_jpeg) -> None:
    """The second request with the key, arriving before the first is recorded, gets 409 with
    Retry-After; after the first's answer, the retry gets that prediction."""
    key = str(uuid.uuid4())
    with first_request_held(client, normal_jpeg, key) as results:
        assert_in_use(post(client, normal_jpeg, key))
    original = results["first"].json()["prediction_id"]
    retried = post(client, normal_jpeg, key)
    assert retried.headers["idempotent-replayed"] == "true"
    assert retried.json()["prediction_id"] == original
    assert predictions_in(client) == 1


def test_a_key_survives_a_restart_and_expires(
    tiny_store: Path, tmp_path: Path, normal_jpeg: bytes
) -> None:
    from app.main import create_app

    settings = make_settings(tiny_store, tmp_path / "data", idempotency_hours=1)
    key = str(uuid.uuid4())
    with TestClient(create_app(settings)) as first:
        first.headers["X-API-Key"] = API_KEY
        original = post(first, normal_jpeg, key).json()["prediction_id"]
    with TestClient(create_app(settings)) as restarted:
        restarted.headers["X-API-Key"] = API_KEY
        again = post(restarted, normal_jpeg, key)
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json()["prediction_id"] == original
        records = restarted.app.state.services.records
        assert records.purge(now=time.time() + 1800) == 0  # within the hour: kept
        assert records.idempotency_key(first_key_id(restarted), key_digest(key)) is not None
        records.purge(now=time.time() + 3601)
        assert records.idempotency_key(first_key_id(restarted), key_digest(key)) is None
        later = post(restarted, normal_jpeg, key)
        assert "idempotent-replayed" not in later.headers
        assert later.json()["prediction_id"] != original


def first_key_id(client: TestClient) -> str:
    (key_id,) = {
        row[0]
        for row in sqlite3.connect(audit_database(client.app.state.services.settings.data_dir))
        .execute("SELECT key_id FROM predictions")
        .fetchall()
    }
    return key_id


def test_the_key_itself_is_never_stored_or_logged(
    client, normal_jpeg, caplog: pytest.LogCaptureFixture
) -> None:
    key = "ACC-2026-000123-" + uuid.uuid4().hex  # what a RIS might use: an accession number
    with caplog.at_level(logging.DEBUG):
        assert post(client, normal_jpeg, key).status_code == 200
        assert post(client, normal_jpeg, key).headers["idempotent-replayed"] == "true"
    assert key not in caplog.text
    assert any(r.getMessage() == "prediction replayed" for r in caplog.records)
    database = audit_database(client.app.state.services.settings.data_dir)
    for path in database.parent.iterdir():
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path.name
    metrics = client.get("/metrics").text
    assert "pneumoscan_idempotent_replays_total 1.0" in metrics


def test_a_request_whose_client_gave_up_is_answered_to_its_retry(
    tiny_store: Path, tmp_path: Path, normal_jpeg: bytes
) -> None:
    """Real uvicorn: a gateway sends its image and drops the connection before the answer (its
    timeout). The service still scores and records it, and the retry, sent at once, gets that
    prediction (after a 409 with Retry-After if the first is still being scored)."""
    import socket

    import httpx

    from benchmarks.common import BENCH_KEY, running_server

    key = str(uuid.uuid4())
    headers = {"X-API-Key": BENCH_KEY, "Idempotency-Key": key, "Content-Type": "image/jpeg"}
    with running_server(tiny_store, tmp_path / "data") as server:
        host, port = server["url"].removeprefix("http://").split(":")
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        with socket.create_connection((host, int(port)), timeout=10) as gateway:
            gateway.sendall(
                f"POST /predict HTTP/1.1\r\nHost: {host}\r\n{head}"
                f"Content-Length: {len(normal_jpeg)}\r\n\r\n".encode()
                + normal_jpeg
            )
        # the answer is never read: the gateway's timeout fired
        statuses = []
        for _ in range(20):
            retry = httpx.post(
                f"{server['url']}/predict", content=normal_jpeg, headers=headers, timeout=30
            )
            statuses.append(retry.status_code)
            if retry.status_code != 409:
                break
            time.sleep(float(retry.headers["retry-after"]))
        log = server["log"].read_text()
    assert statuses[-1] == 200 and set(statuses[:-1]) <= {409}, statuses
    assert retry.headers["idempotent-replayed"] == "true"
    database = sqlite3.connect(tmp_path / "data" / "pneumoscan.sqlite3")
    (made,) = database.execute("SELECT id FROM predictions").fetchall()
    database.close()
    assert retry.json()["prediction_id"] == made[0]  # the first request's, recorded once
    assert "Traceback" not in log, log[-2000:]


def test_two_instances_on_one_data_dir_score_a_key_once(
    tiny_store: Path, tmp_path: Path, normal_jpeg: bytes, pneumonia_jpeg: bytes
) -> None:
    """Two instances share the audit database (two containers on one volume). The first
    request with a key is held in instance 1's model queue; its retry, sent to instance 2
    meanwhile, waits (409) instead of scoring the image a second time, and afterwards gets
    instance 1's prediction. Until round 24 both instances scored it."""
    from app.main import create_app

    settings = make_settings(tiny_store, tmp_path / "data")
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
        for client in (one, two):
            client.headers["X-API-Key"] = API_KEY
        key = str(uuid.uuid4())
        with first_request_held(one, normal_jpeg, key) as results:
            assert_in_use(post(two, normal_jpeg, key))
            other_image = post(two, pneumonia_jpeg, key)  # a client bug, even meanwhile
            assert other_image.json()["error"]["code"] == "idempotency_key_reused"
        original = results["first"]
        assert original.status_code == 200, original.text
        retried = post(two, normal_jpeg, key)
        assert retried.headers["idempotent-replayed"] == "true"
        assert retried.json()["prediction_id"] == original.json()["prediction_id"]
        assert predictions_in(two) == 1
        claims = sqlite3.connect(audit_database(settings.data_dir))
        assert claims.execute("SELECT COUNT(*) FROM idempotency_claims").fetchone()[0] == 0
        claims.close()


CLAIM_AND_WAIT = """
import sys, time
from pathlib import Path
from app.records import RecordStore
store = RecordStore(Path(sys.argv[1]), 3600)
assert store.claim_idempotency_key(sys.argv[2], sys.argv[3], sys.argv[4]) is None
print("claimed", flush=True)
time.sleep(120)
"""


def test_a_key_claimed_by_an_instance_that_was_killed_is_taken_over_at_once(
    tiny_store: Path, tmp_path: Path, normal_jpeg: bytes
) -> None:
    """An instance that claimed a key and was killed (kill -9) before recording a prediction
    holds nothing: a retry to another instance is scored at once, not after the claim lapses
    (app.instance_lease)."""
    import hashlib
    import os
    import signal
    import subprocess
    import sys

    from app.main import create_app
    from app.security import key_id as key_id_of

    settings = make_settings(tiny_store, tmp_path / "data")
    key = str(uuid.uuid4())
    image = hashlib.sha256(normal_jpeg).hexdigest()
    with TestClient(create_app(settings)) as survivor:
        survivor.headers["X-API-Key"] = API_KEY
        holder = subprocess.Popen(
            [sys.executable, "-c", CLAIM_AND_WAIT, str(settings.data_dir), key_id_of(API_KEY),
             key_digest(key), image],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        try:
            assert holder.stdout.readline().strip() == "claimed"
            held = post(survivor, normal_jpeg, key)
            assert held.status_code == 409, held.text  # the holder runs: it may answer yet
        finally:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(10)
        scored = post(survivor, normal_jpeg, key)
        assert scored.status_code == 200, scored.text
        assert "idempotent-replayed" not in scored.headers
        again = post(survivor, normal_jpeg, key)
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json()["prediction_id"] == scored.json()["prediction_id"]
        assert predictions_in(survivor) == 1
    leases = settings.data_dir / "instances"
    assert len(list(leases.glob("*.lock"))) == 1  # the killed one's; the survivor removed its own
    RecordStore(settings.data_dir, 3600).close()  # the next instance to start clears it
    assert list(leases.glob("*.lock")) == []


def test_claims_lapse_are_released_and_end_with_the_prediction(
    tmp_path: Path, normal_jpeg: bytes
) -> None:
    """app.records' claims between two stores on one database, as two instances hold them."""
    from app.idempotency import CLAIM_LAPSE_S, ClaimedElsewhere, ReplayEntry
    from tests.test_records import _record

    one, two = RecordStore(tmp_path, 3600), RecordStore(tmp_path, 3600)
    try:
        assert one.claim_idempotency_key("k1", "h", "image") is None
        assert two.claim_idempotency_key("k1", "h", "image") == ClaimedElsewhere("image")
        assert two.claim_idempotency_key("k1", "h", "other") == ClaimedElsewhere("image")
        assert one.claim_idempotency_key("k1", "h", "image") is None  # its own: stale
        assert two.claim_idempotency_key("k2", "h", "image") is None  # keys are per API key
        # a holder that still runs but has held the claim past its lapse has lost it
        later = time.time() + CLAIM_LAPSE_S + 1
        assert two.claim_idempotency_key("k1", "h", "image", now=later) is None
        assert one.claim_idempotency_key("k1", "h", "image") == ClaimedElsewhere("image")
        two.release_idempotency_claim("k1", "h")
        assert one.claim_idempotency_key("k1", "h", "image") is None
        one.release_idempotency_claim("k1", "h")
        # the prediction's transaction records the key and ends the claim
        assert one.claim_idempotency_key("k1", "h", "image") is None
        made = dataclasses.replace(_record(1), key_id="k1", image_sha256="image")
        entry = ReplayEntry("h", time.time() + 3600, None, None)
        one.add(made, np.zeros((224, 224), np.uint8), entry)
        used = two.claim_idempotency_key("k1", "h", "image")
        assert used is not None and not isinstance(used, ClaimedElsewhere)
        assert used.prediction_id == made.id
        # the purge deletes lapsed claims
        assert one.claim_idempotency_key("k3", "h", "image") is None
        one.purge(now=later)
        assert two.claim_idempotency_key("k3", "h", "image") is None
    finally:
        one.close()
        two.close()


def test_an_instance_lease_is_held_while_its_process_runs(tmp_path: Path) -> None:
    from app.instance_lease import InstanceLease

    one, two = InstanceLease(tmp_path), InstanceLease(tmp_path)
    assert one.is_running(one.id) and one.is_running(two.id) and two.is_running(one.id)
    assert not one.is_running("0123456789abcdef")  # no such instance
    assert not one.is_running("../../etc/passwd")  # not an id: never a path
    gone = two.id
    two.close()
    assert not one.is_running(gone)
    # a lock file left unlocked (its process killed) is swept by the next instance to start
    (tmp_path / "instances" / f"{gone}.lock").touch()
    three = InstanceLease(tmp_path)
    assert not (tmp_path / "instances" / f"{gone}.lock").exists()
    assert (tmp_path / "instances" / f"{one.id}.lock").exists()  # a running one is kept
    one.close()
    three.close()


def test_without_file_locks_a_claim_only_lapses(tmp_path: Path, monkeypatch, caplog) -> None:
    """On a file system without flock (some network shares) the service still starts; an
    instance's liveness cannot be told, so another's claims are honoured until they lapse."""
    import fcntl

    from app.instance_lease import InstanceLease

    running = InstanceLease(tmp_path)

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING):
        lockless = InstanceLease(tmp_path)
    assert "no file locks" in caplog.text
    assert lockless.is_running("0123456789abcdef")  # cannot tell: taken as running
    assert not list((tmp_path / "instances").glob(".*.pending"))
    lockless.close()
    running.close()
