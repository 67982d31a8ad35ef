"""The radiologist's read of a scored image (PUT /predictions/{id}/reading), the stored
prediction (GET /predictions/{id}), the `pneumoscan_readings` gauge and the
`pneumoscan readings` report of the model against a site's readers."""

from __future__ import annotations

import io
import json
import sqlite3
import time
from datetime import datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.readings import main as readings_main
from app.readings import read_counts, summarise, wilson
from app.security import key_id
from tests.conftest import API_KEY, OTHER_KEY, fixture_bytes, make_settings

JPEG = fixture_bytes("chest_xray/PNEUMONIA/person495_bacteria_2094.jpeg")
OTHER_LABEL = {"NORMAL": "PNEUMONIA", "PNEUMONIA": "NORMAL"}


def predict(client: TestClient) -> dict:
    answer = client.post("/predict", files={"file": ("a.jpeg", JPEG)})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_read_is_recorded_corrected_and_shown_with_the_stored_prediction(client) -> None:
    made = predict(client)
    url = f"/predictions/{made['prediction_id']}"
    stored = client.get(url)
    assert stored.status_code == 200, stored.text
    body = stored.json()
    assert body["label"] == made["label"] and body["reading"] is None
    assert body["probabilities"] == made["probabilities"]
    assert body["input"] == made["input"] and body["model"] == made["model"]
    assert body["explain_url"] == made["explain_url"]
    assert body["created"].endswith("Z") or body["created"].endswith("+00:00")

    disagree = client.put(f"{url}/reading", json={"label": OTHER_LABEL[made["label"]]})
    assert disagree.status_code == 200, disagree.text
    assert disagree.json()["agrees"] is False
    assert disagree.json()["model_label"] == made["label"]
    corrected = client.put(f"{url}/reading", json={"label": made["label"]})
    assert corrected.json()["agrees"] is True  # the last read counts
    assert client.get(url).json()["reading"]["reader_label"] == made["label"]
    metrics = client.get("/metrics").text
    database = client.app.state.services.records.database_id
    expected = (
        f'pneumoscan_readings{{database="{database}",model_label="{made["label"]}",'
        f'model_version="1",reader_label="{made["label"]}"}} 1.0'
    )
    assert expected in metrics
    assert f'reader_label="{OTHER_LABEL[made["label"]]}"' not in metrics


def test_only_the_key_that_made_the_prediction_sees_or_reads_it(client) -> None:
    made = predict(client)
    url = f"/predictions/{made['prediction_id']}"
    other = {"X-API-Key": OTHER_KEY}
    assert client.get(url, headers=other).status_code == 404
    assert client.put(f"{url}/reading", json={"label": "NORMAL"}, headers=other).status_code == 404
    assert client.get(url, headers={"X-API-Key": ""}).status_code == 401
    assert client.get(f"/predictions/{'0' * 32}").status_code == 404
    assert client.get("/predictions/not-an-id").status_code == 422
    assert client.get(url).json()["reading"] is None


@pytest.mark.parametrize(
    "body",
    [b'{"label": "pneumonia?"}', b"{}", b'{"label": "NORMAL", "patient": "Doe^Jane"}', b"NORMAL"],
)
def test_a_read_that_is_not_one_of_the_two_labels_is_refused(client, body: bytes) -> None:
    made = predict(client)
    answer = client.put(
        f"/predictions/{made['prediction_id']}/reading",
        content=body,
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 422
    assert answer.json()["error"]["code"] == "invalid_body"


def test_a_large_body_is_refused_without_reading_it_all(client) -> None:
    made = predict(client)
    url = f"/predictions/{made['prediction_id']}/reading"
    announced = client.put(url, content=b" " * 5000, headers={"Content-Type": "application/json"})
    assert announced.status_code == 413

    def chunks():
        yield b'{"label": "NORMAL"' + b" " * 3000
        yield b" " * 3000 + b"}"

    streamed = client.put(url, content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413


def test_a_read_that_cannot_be_stored_is_503(client, monkeypatch) -> None:
    made = predict(client)

    def full(readings) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(client.app.state.services.records, "set_readings", full)
    answer = client.put(f"/predictions/{made['prediction_id']}/reading", json={"label": "NORMAL"})
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "storage_unavailable"


def test_the_report_measures_the_model_against_the_reads_across_restarts(
    tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    labels = []
    with TestClient(
        create_app(make_settings(tiny_store, data)), headers={"X-API-Key": API_KEY}
    ) as c:
        for read_as_model in (True, True, False):
            made = predict(c)
            read = made["label"] if read_as_model else OTHER_LABEL[made["label"]]
            labels.append((made["label"], read))
            c.put(f"/predictions/{made['prediction_id']}/reading", json={"label": read})
    with TestClient(
        create_app(make_settings(tiny_store, data)), headers={"X-API-Key": API_KEY}
    ) as c:
        metrics = c.get("/metrics").text  # from the database: a restart does not reset it
        assert (
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("pneumoscan_readings{")
            )
            == 3
        )
    assert readings_main(["--data-dir", str(data)]) == 0
    report = json.loads(capsys.readouterr().out)["versions"]["1"]
    assert report["reads"] == 3
    assert report["agreement"]["value"] == round(2 / 3, 4)
    confusion = report["confusion"]
    tp = sum(1 for model, read in labels if model == read == "PNEUMONIA")
    assert confusion["tp"] == tp and sum(confusion.values()) == 3
    assert readings_main(["--data-dir", str(tmp_path / "nowhere")]) == 2


def test_rates_have_wilson_intervals() -> None:
    assert wilson(8, 10) == [0.4902, 0.9433]
    assert wilson(0, 0) is None and wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0
    report = summarise(
        [
            (2, "PNEUMONIA", "PNEUMONIA", 97),
            (2, "NORMAL", "PNEUMONIA", 3),
            (2, "PNEUMONIA", "NORMAL", 20),
            (2, "NORMAL", "NORMAL", 80),
        ]
    )["2"]
    assert report["sensitivity"]["value"] == 0.97 and report["sensitivity"]["n"] == 100
    assert report["specificity"]["value"] == 0.8
    assert report["ppv"]["value"] == round(97 / 117, 4)
    lower, upper = report["specificity"]["ci95"]
    assert lower < 0.8 < upper


def test_the_report_splits_the_reads_by_age_check_and_by_sender(
    tiny_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A site that scores adults sees the model's agreement with its readers on them apart
    from the children the model learned from."""
    import numpy as np
    from PIL import Image

    from tests.utils.dicom_factory import make_dicom

    gray = np.asarray(Image.open(io.BytesIO(JPEG)).convert("L"))
    uploads = {  # each DICOM its own image (SOP Instance UID): reads count once per image
        "child": make_dicom(gray, attributes={"PatientAge": "004Y"}),
        "child 2": make_dicom(gray, attributes={"PatientAge": "003Y"}),
        "adult": make_dicom(gray, attributes={"PatientAge": "060Y"}),
        "jpeg": JPEG,
    }
    data = tmp_path / "data"
    with TestClient(
        create_app(make_settings(tiny_store, data)), headers={"X-API-Key": API_KEY}
    ) as c:
        for name, agree in (("child", True), ("child 2", True), ("adult", False), ("jpeg", True)):
            # the adult's image comes from another site's gateway (another key)
            key = {"X-API-Key": OTHER_KEY if name == "adult" else API_KEY}
            made = c.post("/predict", files={"file": ("x", uploads[name])}, headers=key).json()
            read = made["label"] if agree else OTHER_LABEL[made["label"]]
            c.put(
                f"/predictions/{made['prediction_id']}/reading", json={"label": read}, headers=key
            )
    assert readings_main(["--data-dir", str(data)]) == 0
    version = json.loads(capsys.readouterr().out)["versions"]["1"]
    assert version["reads"] == 4
    split = version["by_age_check"]
    assert {status: rates["reads"] for status, rates in split.items()} == {
        "within": 2,
        "outside": 1,
        "unknown": 1,
    }
    assert split["within"]["agreement"]["value"] == 1.0
    assert split["outside"]["agreement"]["value"] == 0.0
    # and by the key that sent the images: each site apart, by key id (never the key)
    senders = version["by_sender"]
    assert {sender: rates["reads"] for sender, rates in senders.items()} == {
        key_id(API_KEY): 3,
        key_id(OTHER_KEY): 1,
    }
    assert senders[key_id(OTHER_KEY)]["agreement"]["value"] == 0.0


def test_reads_from_before_the_age_check_count_as_not_checked(tmp_path: Path) -> None:
    """A database written before round 19 has no age_check column; the report, which opens it
    read-only and cannot add it, counts those reads as not checked."""
    from app.readings import read_counts_split

    database = tmp_path / "pneumoscan.sqlite3"
    db = sqlite3.connect(database)
    db.execute("CREATE TABLE predictions (id TEXT PRIMARY KEY)")
    db.execute(
        "CREATE TABLE readings (id TEXT PRIMARY KEY, recorded REAL, key_id TEXT, "
        "reader_label TEXT, model_version INTEGER, model_label TEXT)"
    )
    db.execute("INSERT INTO predictions VALUES ('a')")
    db.execute("INSERT INTO readings VALUES ('a', 1.0, 'k', 'NORMAL', 6, 'PNEUMONIA')")
    db.commit()
    db.close()
    found = read_counts_split(database, 0.0, "age_check")
    assert found == {"not checked": [(6, "PNEUMONIA", "NORMAL", 1)]}


READER_KEY = "test-reader-key-cccccccccccc"  # the RIS's (PNEUMOSCAN_READER_KEYS)
STUDY = "1.2.826.0.1.3680043.8.498.20261203"


def dicom_of(study: str, sop: str) -> bytes:
    """The DICOM fixture as another image: its own study and SOP Instance UIDs."""
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(fixture_bytes("dicom/person1946_bacteria_4874.dcm")))
    dataset.StudyInstanceUID = study
    dataset.SOPInstanceUID = sop
    dataset.file_meta.MediaStorageSOPInstanceUID = sop
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture
def ris(tiny_store: Path, tmp_path: Path):
    settings = make_settings(tiny_store, tmp_path / "data", reader_keys=READER_KEY)
    with TestClient(create_app(settings)) as client:
        yield client


def reads_counted(client: TestClient) -> float:
    """The reads `pneumoscan_readings` counts, all versions and labels together."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("pneumoscan_readings{")
    )


def scored(client: TestClient, key: str, study: str, sop: str) -> str:
    answer = client.post(
        "/predict", files={"file": ("x.dcm", dicom_of(study, sop))}, headers={"X-API-Key": key}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["prediction_id"]


def test_a_ris_reports_a_study_s_read_by_its_study_uid_with_a_reader_key(ris) -> None:
    """The RIS knows the study when the report is signed, not the prediction ids the PACS
    gateway got: the read reaches each scored image of the study, once per image."""
    gateway, other_site, reader = ({"X-API-Key": key} for key in (API_KEY, OTHER_KEY, READER_KEY))
    first_try = scored(ris, API_KEY, STUDY, f"{STUDY}.1")
    pa = scored(ris, API_KEY, STUDY, f"{STUDY}.1")  # the same image sent again: counts once
    repeat = scored(ris, OTHER_KEY, STUDY, f"{STUDY}.2")  # another gateway's image of it
    elsewhere = scored(ris, API_KEY, f"{STUDY}9", f"{STUDY}9.1")  # another study

    answer = ris.put(f"/studies/{STUDY}/reading", json={"label": "PNEUMONIA"}, headers=reader)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["study_instance_uid"] == STUDY
    assert sorted(r["prediction_id"] for r in body["readings"]) == sorted([pa, repeat])
    assert {r["reader_label"] for r in body["readings"]} == {"PNEUMONIA"}
    for prediction_id in (pa, repeat):  # the reader key looks up any key's prediction
        stored = ris.get(f"/predictions/{prediction_id}", headers=reader).json()
        assert stored["reading"]["reader_label"] == "PNEUMONIA"
        assert stored["explain_url"] is None  # a reader key cannot pull overlays (403)
    for untouched in (first_try, elsewhere):
        own_view = ris.get(f"/predictions/{untouched}", headers=gateway).json()
        assert own_view["reading"] is None
        assert own_view["explain_url"] == f"/explain/{untouched}"
    assert reads_counted(ris) == 2

    # an API key reaches only its own predictions of the study; a corrected read replaces
    own = ris.put(f"/studies/{STUDY}/reading", json={"label": "NORMAL"}, headers=other_site)
    assert [r["prediction_id"] for r in own.json()["readings"]] == [repeat]
    assert (
        ris.get(f"/predictions/{repeat}", headers=reader).json()["reading"]["reader_label"]
        == "NORMAL"
    )
    assert ris.get(f"/predictions/{pa}", headers=other_site).status_code == 404

    # what the RIS shows beside the study: every prediction of it, with the reads
    listed = ris.get(f"/studies/{STUDY}/predictions", headers=reader)
    assert listed.status_code == 200, listed.text
    shown = {p["prediction_id"]: p for p in listed.json()["predictions"]}
    assert list(shown) == [first_try, pa, repeat]  # oldest first, the image sent twice twice
    assert shown[pa]["dicom"]["sop_instance_uid"] == f"{STUDY}.1"
    assert shown[pa]["reading"]["reader_label"] == "PNEUMONIA"
    assert shown[repeat]["reading"]["reader_label"] == "NORMAL"
    assert shown[first_try]["reading"] is None
    assert {p["explain_url"] for p in shown.values()} == {None}
    own_list = ris.get(f"/studies/{STUDY}/predictions", headers=other_site).json()
    assert [p["prediction_id"] for p in own_list["predictions"]] == [repeat]
    assert ris.get(f"/studies/{STUDY}7/predictions", headers=reader).status_code == 404
    assert ris.get("/studies/1.2.x/predictions", headers=reader).status_code == 422

    # the same read by prediction id, with the reader key
    by_id = ris.put(f"/predictions/{pa}/reading", json={"label": "NORMAL"}, headers=reader)
    assert by_id.status_code == 200 and by_id.json()["prediction_id"] == pa


def test_a_reader_key_reports_reads_and_nothing_else(ris) -> None:
    made = scored(ris, API_KEY, STUDY, f"{STUDY}.1")
    reader = {"X-API-Key": READER_KEY}
    for method, url, kwargs in (
        ("POST", "/predict", {"files": {"file": ("a.jpeg", JPEG)}}),
        ("GET", f"/explain/{made}", {}),
        ("GET", "/models", {}),
    ):
        refused = ris.request(method, url, headers=reader, **kwargs)
        assert refused.status_code == 403, (url, refused.text)
        assert refused.json()["error"]["code"] == "forbidden"
        assert "PNEUMOSCAN_READER_KEYS" in refused.json()["error"]["message"]
    no_key = ris.put(f"/studies/{STUDY}/reading", json={"label": "NORMAL"})
    assert no_key.status_code == 401
    bearer = {"Authorization": f"Bearer {READER_KEY}"}
    assert ris.post("/predict", content=JPEG, headers=bearer).status_code == 403
    assert ris.get(f"/predictions/{made}", headers=bearer).status_code == 200


@pytest.mark.parametrize(
    ("study", "body", "status", "code"),
    [
        ("1.2.abc", b'{"label": "NORMAL"}', 422, None),  # not a UID
        ("1." + "2" * 70, b'{"label": "NORMAL"}', 422, None),  # over 64 characters
        (STUDY, b'{"label": "maybe"}', 422, "invalid_body"),
        (STUDY, b'{"label": "NORMAL", "note": "free text"}', 422, "invalid_body"),
    ],
)
def test_a_study_read_that_cannot_apply_is_refused(
    ris, study: str, body: bytes, status: int, code: str | None
) -> None:
    scored(ris, API_KEY, STUDY, f"{STUDY}.1")
    answer = ris.put(
        f"/studies/{study}/reading",
        content=body,
        headers={"X-API-Key": READER_KEY, "Content-Type": "application/json"},
    )
    assert answer.status_code == status, answer.text
    if code is not None:
        assert answer.json()["error"]["code"] == code


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"reader_keys": API_KEY}, "in both PNEUMOSCAN_API_KEYS and PNEUMOSCAN_READER_KEYS"),
        ({"reader_keys": "short-key"}, "PNEUMOSCAN_READER_KEYS entry must be at least 16"),
    ],
)
def test_reader_keys_are_their_own_and_strong(
    tiny_store: Path, tmp_path: Path, values: dict, expected: str
) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=expected):
        make_settings(tiny_store, tmp_path, **values)


def test_a_study_s_predictions_are_bounded_to_the_latest(client, monkeypatch) -> None:
    """A caller sending one study's UID with thousands of uploads cannot make the study's
    answers unbounded: the latest STUDY_LIMIT predictions count."""
    from app import records

    monkeypatch.setattr(records.RecordStore.by_study, "__defaults__", (3,))
    made = [scored(client, API_KEY, STUDY, f"{STUDY}.{n}") for n in range(5)]
    listed = client.get(f"/studies/{STUDY}/predictions").json()["predictions"]
    assert [p["prediction_id"] for p in listed] == made[2:]
    read = client.put(f"/studies/{STUDY}/reading", json={"label": "NORMAL"}).json()
    assert sorted(r["prediction_id"] for r in read["readings"]) == sorted(made[2:])


def reader_label(client: TestClient, prediction_id: str) -> str | None:
    stored = client.get(f"/predictions/{prediction_id}", headers={"X-API-Key": READER_KEY})
    assert stored.status_code == 200, stored.text
    reading = stored.json()["reading"]
    return None if reading is None else reading["reader_label"]


def test_a_read_reported_before_the_study_is_scored_reaches_its_images_as_they_are(
    ris, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RIS can report before the gateway's images are scored (a backlog after an outage, an
    image sent after the report): the read is held, and recorded for each image of the study
    as it is scored, under the same rules as a read of scored images."""
    import time

    reader, other_site = {"X-API-Key": READER_KEY}, {"X-API-Key": OTHER_KEY}
    before = time.time()
    held = ris.put(f"/studies/{STUDY}/reading", json={"label": "PNEUMONIA"}, headers=reader)
    assert held.status_code == 202, held.text
    assert held.json()["readings"] == []
    held_until = datetime.fromisoformat(held.json()["held_until"]).timestamp()
    assert before + 30 * 86400 <= held_until <= time.time() + 30 * 86400
    assert ris.get(f"/studies/{STUDY}/predictions", headers=reader).status_code == 404

    pa = scored(ris, API_KEY, STUDY, f"{STUDY}.1")
    again = scored(ris, API_KEY, STUDY, f"{STUDY}.1")  # the same image: counts once
    lateral = scored(ris, OTHER_KEY, STUDY, f"{STUDY}.2")  # a reader key's read: every key's
    elsewhere = scored(ris, API_KEY, f"{STUDY}9", f"{STUDY}9.1")
    assert reader_label(ris, pa) == "PNEUMONIA"
    assert reader_label(ris, again) is None
    assert reader_label(ris, lateral) == "PNEUMONIA"
    assert reader_label(ris, elsewhere) is None
    assert reads_counted(ris) == 2

    # a corrected report replaces the read, for the images scored and those still to come
    corrected = ris.put(f"/studies/{STUDY}/reading", json={"label": "NORMAL"}, headers=reader)
    assert corrected.status_code == 200
    assert sorted(r["prediction_id"] for r in corrected.json()["readings"]) == sorted(
        [again, lateral]  # the latest prediction of each image
    )
    late = scored(ris, API_KEY, STUDY, f"{STUDY}.3")
    assert reader_label(ris, late) == "NORMAL"

    # an API key's held read reaches its own images of the study only
    own = f"{STUDY}8"
    assert ris.put(f"/studies/{own}/reading", json={"label": "NORMAL"}, headers=other_site)
    assert reader_label(ris, scored(ris, API_KEY, own, f"{own}.1")) is None
    assert reader_label(ris, scored(ris, OTHER_KEY, own, f"{own}.2")) == "NORMAL"

    # past its hold the read no longer waits; the reads it made stay
    ris.app.state.services.records.purge(now=time.time() + 31 * 86400)
    assert reader_label(ris, scored(ris, API_KEY, STUDY, f"{STUDY}.4")) is None
    assert reader_label(ris, late) == "NORMAL"

    # held reads are bounded: beyond the limit a read for an unscored study is not held
    monkeypatch.setattr(ris.app.state.services.records, "max_study_reads", 1)
    first = ris.put(f"/studies/{STUDY}5/reading", json={"label": "NORMAL"}, headers=reader)
    assert first.status_code == 202  # the one held now (the others have expired)
    refused = ris.put(f"/studies/{STUDY}6/reading", json={"label": "NORMAL"}, headers=reader)
    assert refused.status_code == 404 and "too many reads" in refused.json()["error"]["message"]
    assert reader_label(ris, scored(ris, API_KEY, f"{STUDY}6", f"{STUDY}6.1")) is None
    # a study with scored images is read whatever the number held
    assert (
        ris.put(f"/studies/{own}/reading", json={"label": "NORMAL"}, headers=reader).status_code
        == 200
    )


def test_an_image_sent_twice_and_read_on_both_predictions_counts_once(ris) -> None:
    """A PACS re-sends an image; a RIS reports a read by prediction id for each entry of
    GET /studies/{uid}/predictions: the site's counts take the image once, by its latest read,
    in /metrics and in `pneumoscan readings`."""
    reader = {"X-API-Key": READER_KEY}
    first = scored(ris, API_KEY, STUDY, f"{STUDY}.1")
    again = scored(ris, API_KEY, STUDY, f"{STUDY}.1")
    other = scored(ris, API_KEY, STUDY, f"{STUDY}.2")
    listed = ris.get(f"/studies/{STUDY}/predictions", headers=reader).json()["predictions"]
    assert [p["prediction_id"] for p in listed] == [first, again, other]
    for prediction_id, label in ((first, "NORMAL"), (again, "PNEUMONIA"), (other, "NORMAL")):
        answer = ris.put(
            f"/predictions/{prediction_id}/reading", json={"label": label}, headers=reader
        )
        assert answer.status_code == 200
    assert reads_counted(ris) == 2
    data_dir = ris.app.state.services.settings.data_dir
    counts = read_counts(data_dir / "pneumoscan.sqlite3", 0.0)
    assert sum(count for *_, count in counts) == 2
    assert sorted((reader_label, count) for _, _, reader_label, count in counts) == [
        ("NORMAL", 1),
        ("PNEUMONIA", 1),  # the image sent twice, by its latest read
    ]


def test_an_image_scored_while_the_study_read_is_recorded_gets_it(tmp_path: Path) -> None:
    """The route looks the study up, then records the read: an image committed in between
    (the gateway's backlog flowing in as the RIS reports) is read in the same transaction."""
    import time

    import numpy as np

    from app.records import PredictionRecord, Reading, RecordStore, StudyRead

    def image(index: int, sop: str) -> PredictionRecord:
        return PredictionRecord(
            f"{index:032x}", time.time(), "key-a", "pneumonia", 1, 0.3, 0.7, "PNEUMONIA", 0.5,
            "0" * 64, "DICOM", 10, 300, 300, study_uid=STUDY, sop_uid=sop,
        )  # fmt: skip

    store = RecordStore(tmp_path, retention_seconds=3600)
    pixels = np.zeros((224, 224), np.uint8)
    store.add(image(1, f"{STUDY}.1"), pixels)
    seen = store.by_study(STUDY)  # the route's lookup
    store.add(image(2, f"{STUDY}.2"), pixels)  # committed before the read's transaction
    store.add(image(3, f"{STUDY}.1"), pixels)  # the first image sent again
    now = time.time()
    readings = [Reading(r.id, now, "key-r", "NORMAL", 1, r.label) for r in seen]
    held = StudyRead(STUDY, now, "key-r", "NORMAL", True, now + 86400)
    late = store.set_study_read(held, readings)
    assert [row[0] for row in late] == [f"{2:032x}"]  # read; the re-sent image is not
    assert set(store.readings([f"{n:032x}" for n in (1, 2, 3)])) == {f"{1:032x}", f"{2:032x}"}
    store.close()


def test_the_hold_and_its_bound_are_the_site_s_to_set(tiny_store: Path, tmp_path: Path) -> None:
    """PNEUMOSCAN_STUDY_READ_HOLD_DAYS sets how long a read waits for its study's images;
    PNEUMOSCAN_MAX_STUDY_READS=0 holds none (a read for an unscored study is 404)."""
    reader = {"X-API-Key": READER_KEY}
    settings = make_settings(
        tiny_store, tmp_path / "a", reader_keys=READER_KEY, study_read_hold_days=2
    )
    with TestClient(create_app(settings)) as ris:
        before = time.time()
        held = ris.put(f"/studies/{STUDY}/reading", json={"label": "PNEUMONIA"}, headers=reader)
        assert held.status_code == 202
        held_until = datetime.fromisoformat(held.json()["held_until"]).timestamp()
        assert before + 2 * 86400 <= held_until <= time.time() + 2 * 86400
        ris.app.state.services.records.purge(now=time.time() + 1.5 * 86400)
        assert reader_label(ris, scored(ris, API_KEY, STUDY, f"{STUDY}.1")) == "PNEUMONIA"
        ris.app.state.services.records.purge(now=time.time() + 2.5 * 86400)
        assert reader_label(ris, scored(ris, API_KEY, STUDY, f"{STUDY}.2")) is None
    settings = make_settings(tiny_store, tmp_path / "b", reader_keys=READER_KEY, max_study_reads=0)
    with TestClient(create_app(settings)) as ris:
        refused = ris.put(f"/studies/{STUDY}/reading", json={"label": "NORMAL"}, headers=reader)
        assert refused.status_code == 404
        scored(ris, API_KEY, STUDY, f"{STUDY}.1")
        read = ris.put(f"/studies/{STUDY}/reading", json={"label": "NORMAL"}, headers=reader)
        assert read.status_code == 200  # a study with a scored image is read all the same
