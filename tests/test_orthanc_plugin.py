"""The Orthanc plugin's study logic, run against an in-memory stand-in for Orthanc's `orthanc`
module (the real Orthanc round trip is `python -m integrations.orthanc.e2e`, run by `.ci/run`)."""

from __future__ import annotations

import base64
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from app.dicom import FOR_PROCESSING_CLASSES, NOT_CHEST_BODY_PARTS, NOT_FRONTAL_VIEWS

PLUGIN = Path(__file__).resolve().parents[1] / "integrations" / "orthanc" / "pneumoscan_plugin.py"
STUDY = "study-1"


class FakeOrthanc(types.ModuleType):
    """The calls the plugin makes (named as Orthanc names them), on a dict of instances and a
    dict of metadata."""

    class ChangeType:
        ORTHANC_STARTED = 1
        NEW_INSTANCE = 2

    def __init__(self) -> None:
        super().__init__("orthanc")
        self.instances: dict[str, dict[str, str]] = {}
        self.metadata: dict[str, str] = {}
        self.stored_srs: list[bytes] = []
        self.created: list[dict] = []  # POST /tools/create-dicom requests (the overlays)
        self.changes: list[dict] = []  # Orthanc's change log
        self.properties: dict[int, str] = {}  # global properties, kept in Orthanc's database
        self.sr_uids: set[str] = set()  # SOP Instance UIDs of the stored SRs (/tools/lookup)
        self.uid_of_sr = None  # how a test's SR bytes give their UID, where a test needs it
        self.kill_on_sr: str | None = None  # "before" / "after" storing an SR: Killed()
        self.idempotency_keys: list[str] = []  # sent with each POST /predict

    def add(self, instance_id: str, date: str = "20261202T120000", **tags: str) -> None:
        seq = len(self.changes) + 1
        self.changes.append(
            {"Seq": seq, "ChangeType": "NewInstance", "ID": instance_id, "Date": date}
        )
        self.instances[instance_id] = {
            "Modality": "DX",
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1",
            **tags,
        }

    def RestApiGet(self, path: str):
        if path == "/changes?last":
            return json.dumps(
                {"Changes": self.changes[-1:], "Done": True, "Last": len(self.changes)}
            )
        if path.startswith("/changes?since="):
            since, limit = (int(v.split("=")[1]) for v in path.split("?")[1].split("&"))
            page = self.changes[since : since + limit]
            done = since + limit >= len(self.changes)
            return json.dumps({"Changes": page, "Done": done, "Last": len(self.changes)})
        parts = path.strip("/").split("/")
        if parts[0] == "studies" and parts[2] == "instances":
            return json.dumps([{"ID": i} for i in self.instances])
        instance_id = parts[1]
        if parts[2] == "simplified-tags":
            return json.dumps(self.instances[instance_id])
        if parts[2] == "study":
            return json.dumps({"ID": STUDY})
        if parts[2] == "file":
            return b"DICM " + instance_id.encode()
        if path not in self.metadata:  # Orthanc answers an absent metadata entry with an error
            raise ValueError("Unknown resource")
        return self.metadata[path].encode()

    def RestApiPut(self, path: str, value: str) -> None:
        self.metadata[path] = value

    def RestApiPost(self, path: str, body: bytes | str) -> bytes | None:
        if path == "/tools/create-dicom":
            request = json.loads(body)
            self.created.append(request)
            overlay_id = f"overlay-{len(self.created)}"
            self.instances[overlay_id] = dict(request["Tags"])  # in the study, as Orthanc does
            return json.dumps({"ID": overlay_id}).encode()
        if path == "/tools/lookup":
            found = body in self.sr_uids
            return json.dumps([{"Type": "Instance", "ID": "sr"}] if found else []).encode()
        assert path == "/instances"
        if self.kill_on_sr == "before":
            raise Killed()
        self.stored_srs.append(body)
        if self.uid_of_sr is not None:
            self.sr_uids.add(self.uid_of_sr(body))
        if self.kill_on_sr == "after":
            raise Killed()
        return None

    def GetGlobalProperty(self, number: int, default: str) -> str:
        return self.properties.get(number, default)

    def SetGlobalProperty(self, number: int, value: str) -> None:
        self.properties[number] = value

    def LogWarning(self, message: str) -> None:
        pass

    def RegisterOnChangeCallback(self, callback) -> None:
        pass


def as_checks(input_check: str | None = None, age_check: str | None = None) -> dict[str, str]:
    """The checks a scripted answer carries, as `_post_predict` returns them from the headers
    (X-Input-Check, X-Age-Check): only those present."""
    checks = {"PneumoscanInputCheck": input_check, "PneumoscanAgeCheck": age_check}
    return {name: value for name, value in checks.items() if value}


class Killed(BaseException):
    """Orthanc stopping mid-call (kill -9): nothing after it in the plugin runs."""


def load_plugin(monkeypatch: pytest.MonkeyPatch, fake: FakeOrthanc, sent: list, answers: dict):
    """A fresh copy of the plugin module, as a (re)started Orthanc loads it."""
    monkeypatch.setitem(sys.modules, "orthanc", fake)
    spec = importlib.util.spec_from_file_location("pneumoscan_plugin_under_test", PLUGIN)
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)

    def post_predict(dicom_bytes: bytes, key: str):
        instance_id = dicom_bytes.decode().removeprefix("DICM ")
        sent.append(instance_id)
        fake.idempotency_keys.append(key)
        answer = answers[instance_id]
        if isinstance(answer, BaseException):
            raise answer
        label, *checks = answer
        return (
            b"SR for " + instance_id.encode(),
            label,
            as_checks(*checks),
            f"prediction-of-{instance_id}",
        )

    monkeypatch.setattr(plugin, "_post_predict", post_predict)
    monkeypatch.setattr(
        plugin, "_get_overlay", lambda prediction_id: b"PNG of " + prediction_id.encode()
    )
    return plugin


@pytest.fixture
def orthanc(monkeypatch: pytest.MonkeyPatch):
    fake, sent, answers = FakeOrthanc(), [], {}
    plugin = load_plugin(monkeypatch, fake, sent, answers)
    return types.SimpleNamespace(fake=fake, plugin=plugin, sent=sent, answers=answers)


def study_metadata(fake: FakeOrthanc, name: str) -> str | None:
    return fake.metadata.get(f"/studies/{STUDY}/metadata/{name}")


@pytest.mark.parametrize("order", [("pa", "repeat", "lateral"), ("repeat", "lateral", "pa")])
def test_a_pneumonia_image_is_not_hidden_by_another_image_of_the_study(orthanc, order) -> None:
    """PA + lateral + a repeat PA: the lateral is not sent, each frontal image keeps its own
    result, and the study shows PNEUMONIA whichever image is scored last."""
    orthanc.fake.add("pa", ViewPosition="PA")
    orthanc.fake.add("repeat", ViewPosition="PA")
    orthanc.fake.add("lateral", ViewPosition="LL")
    orthanc.answers.update({"pa": ("PNEUMONIA", "typical"), "repeat": ("NORMAL", "flagged")})
    for instance_id in order:
        orthanc.plugin.process(instance_id)
    assert sorted(orthanc.sent) == ["pa", "repeat"]
    assert sorted(orthanc.fake.stored_srs) == [b"SR for pa", b"SR for repeat"]
    meta = orthanc.fake.metadata
    assert meta["/instances/pa/metadata/PneumoscanResult"] == "PNEUMONIA"
    assert meta["/instances/repeat/metadata/PneumoscanResult"] == "NORMAL"
    assert "/instances/lateral/metadata/PneumoscanResult" not in meta
    assert study_metadata(orthanc.fake, "PneumoscanResult") == "PNEUMONIA"
    assert study_metadata(orthanc.fake, "PneumoscanInputCheck") == "flagged"


def test_the_study_says_if_any_patient_age_is_outside_the_trained_ages(orthanc) -> None:
    """Each instance keeps its own age check; the study reads outside if any is, else within if
    any is known, else unknown. A version without the age check (no header) stores none."""
    for name in ("child", "unstated", "adult", "old-service"):
        orthanc.fake.add(name)
    orthanc.answers.update(
        {
            "unstated": ("NORMAL", "typical", "unknown"),
            "child": ("NORMAL", "typical", "within"),
            "adult": ("PNEUMONIA", "typical", "outside"),
            "old-service": ("NORMAL", "typical"),
        }
    )
    seen = []
    for name in ("unstated", "child", "adult", "old-service"):
        orthanc.plugin.process(name)
        seen.append(study_metadata(orthanc.fake, "PneumoscanAgeCheck"))
    assert seen == ["unknown", "within", "outside", "outside"]
    meta = orthanc.fake.metadata
    assert meta["/instances/child/metadata/PneumoscanAgeCheck"] == "within"
    assert meta["/instances/adult/metadata/PneumoscanAgeCheck"] == "outside"
    assert "/instances/old-service/metadata/PneumoscanAgeCheck" not in meta


def test_a_failed_image_keeps_the_study_from_reading_normal(orthanc) -> None:
    orthanc.fake.add("first")
    orthanc.fake.add("second", ViewPosition="AP")
    orthanc.answers.update(
        {"first": ValueError("HTTP 422 undecodable_image"), "second": ("NORMAL", "typical")}
    )
    orthanc.plugin.process("first")
    orthanc.plugin.process("second")
    assert study_metadata(orthanc.fake, "PneumoscanResult") == ("error: HTTP 422 undecodable_image")
    assert study_metadata(orthanc.fake, "PneumoscanInputCheck") == "typical"
    orthanc.fake.add("third")
    orthanc.answers["third"] = ("PNEUMONIA", "typical")
    orthanc.plugin.process("third")
    assert study_metadata(orthanc.fake, "PneumoscanResult") == "PNEUMONIA"


def test_only_frontal_chest_radiographs_are_sent(orthanc) -> None:
    should = orthanc.plugin._should_score
    assert should({"Modality": "DX", "ViewPosition": "PA", "BodyPartExamined": "CHEST"})
    assert should({"Modality": "CR", "ViewPosition": "LLD"})
    assert not should({"Modality": "DX", "ViewPosition": "lateral "})
    assert not should({"Modality": "DX", "BodyPartExamined": "HAND"})
    assert not should({"Modality": "CR", "BodyPartExamined": "L SPINE"})
    # Before, only CHEST and THORAX were sent: a site writing TORAX or PORT CHEST got nothing.
    for chest in ("TORAX", "PORT CHEST", "LUNG", "thorax"):
        assert should({"Modality": "CR", "BodyPartExamined": chest})
    assert not should({"Modality": "CT"})
    assert not should({"Modality": "DX", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1.1"})
    assert not should({"Modality": "DX", "PresentationIntentType": "FOR PROCESSING"})
    assert should({"Modality": "DX", "PresentationIntentType": "FOR PRESENTATION"})
    assert not should({"Modality": "SR", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.34"})


def test_the_plugin_skips_exactly_the_images_the_service_refuses(orthanc) -> None:
    assert orthanc.plugin.NOT_FRONTAL_VIEWS == NOT_FRONTAL_VIEWS
    assert orthanc.plugin.FOR_PROCESSING_CLASSES == FOR_PROCESSING_CLASSES
    assert orthanc.plugin.NOT_CHEST_BODY_PARTS == NOT_CHEST_BODY_PARTS


def test_the_change_log_is_followed_from_a_saved_cursor_across_a_kill(orthanc, monkeypatch) -> None:
    """Images stored before the plugin was first loaded are left alone, one stored between the
    load and the worker's first read of the log is scored; an image being scored when Orthanc
    is killed is scored after the restart; a finished one is not sent again."""
    fake, plugin = orthanc.fake, orthanc.plugin
    plugin.LOADED_AT = "20261202T120000"
    fake.add("before-install", date="20261202T115959")
    fake.add("first", date="20261202T120000")  # while Orthanc was starting
    fake.add("second", date="20261202T120001")
    orthanc.answers.update({"first": ("NORMAL", "typical"), "second": Killed()})
    with pytest.raises(Killed):
        plugin.drain(plugin.start_cursor())
    assert orthanc.sent == ["first", "second"]  # not "before-install"
    assert fake.properties[plugin.CURSOR_PROPERTY] == "2"  # past "first" only
    assert "/instances/second/metadata/PneumoscanResult" not in fake.metadata

    restarted = load_plugin(monkeypatch, fake, orthanc.sent, orthanc.answers)
    orthanc.answers["second"] = ("PNEUMONIA", "typical")
    fake.properties[restarted.CURSOR_PROPERTY] = "1"  # as if killed before the cursor moved
    assert restarted.drain(restarted.start_cursor()) == 3
    assert orthanc.sent == ["first", "second", "second"]  # "first" was not sent twice
    assert fake.metadata["/instances/second/metadata/PneumoscanResult"] == "PNEUMONIA"
    assert study_metadata(fake, "PneumoscanResult") == "PNEUMONIA"
    assert fake.properties[restarted.CURSOR_PROPERTY] == "3"


def test_the_first_cursor_is_the_last_change_before_the_plugin_loaded(orthanc) -> None:
    """Found by walking back through the log a page (100 changes) at a time."""
    fake, plugin = orthanc.fake, orthanc.plugin
    plugin.LOADED_AT = "20261202T120000"
    for index in range(250):
        fake.add(f"old-{index}", date="20261201T080000")
    for index in range(230):
        fake.add(f"new-{index}", date="20261202T120005")
    assert plugin.start_cursor() == 250
    assert plugin.start_cursor() == 250  # saved, not searched again
    fake.changes.clear()
    fake.properties.clear()
    assert plugin.start_cursor() == 0  # an empty log


def test_an_outage_is_waited_out_and_said_on_the_study(orthanc, monkeypatch) -> None:
    """Unreachable for 8 tries: after PNEUMOSCAN_MAX_TRIES (6) the study says the image waits for
    the service, and the label replaces that once the service answers. Nothing is given up."""
    plugin, fake = orthanc.plugin, orthanc.fake
    fake.add("during-outage")
    outcomes = [plugin.Transient("connection refused")] * 8 + [("PNEUMONIA", "typical")]
    seen_while_retrying = []

    def sleep(seconds: float) -> None:
        seen_while_retrying.append(study_metadata(fake, "PneumoscanResult"))

    monkeypatch.setattr(plugin, "_post_predict", lambda data, key: _next(outcomes))
    monkeypatch.setattr(plugin.time, "sleep", sleep)
    plugin.process("during-outage")
    assert seen_while_retrying[:5] == [None] * 5
    assert seen_while_retrying[5:] == [plugin.RETRYING] * 3
    assert study_metadata(fake, "PneumoscanResult") == "PNEUMONIA"
    assert fake.metadata["/instances/during-outage/metadata/PneumoscanResult"] == "PNEUMONIA"


def test_a_repeated_500_is_that_image_s_error_and_the_next_is_scored(orthanc, monkeypatch) -> None:
    plugin, fake = orthanc.plugin, orthanc.fake
    fake.add("poison")
    fake.add("next")
    outcomes = [plugin.Transient("HTTP 500 internal", 500)] * 6 + [("NORMAL", "typical")]
    monkeypatch.setattr(plugin, "_post_predict", lambda data, key: _next(outcomes))
    monkeypatch.setattr(plugin.time, "sleep", lambda seconds: None)
    plugin.drain(0)
    assert (
        fake.metadata["/instances/poison/metadata/PneumoscanResult"] == "error: HTTP 500 internal"
    )
    assert fake.metadata["/instances/next/metadata/PneumoscanResult"] == "NORMAL"


def test_an_image_waiting_for_the_service_at_a_kill_is_retried_after_it(orthanc) -> None:
    fake = orthanc.fake
    fake.add("waiting")
    fake.metadata["/instances/waiting/metadata/PneumoscanResult"] = orthanc.plugin.RETRYING
    orthanc.answers["waiting"] = ("NORMAL", "typical")
    orthanc.plugin.process("waiting")
    assert orthanc.sent == ["waiting"]
    assert fake.metadata["/instances/waiting/metadata/PneumoscanResult"] == "NORMAL"


def test_every_try_of_an_image_sends_one_idempotency_key(orthanc, monkeypatch) -> None:
    """A try whose answer was lost (a reset, a timeout, a 409 while the first try is still
    scored) and the try after a restart send the same Idempotency-Key, so the service answers
    its first prediction again; another file under the same instance is another image."""
    plugin, fake = orthanc.plugin, orthanc.fake
    fake.add("lost-answers")
    keys: list[str] = []
    outcomes = [
        plugin.Transient("connection reset by peer"),
        plugin.Transient("HTTP 409 idempotency_key_in_use", 409),
        ("NORMAL", "typical"),
    ]

    def post_predict(data: bytes, key: str):
        keys.append(key)
        return _next(outcomes)

    monkeypatch.setattr(plugin, "_post_predict", post_predict)
    monkeypatch.setattr(plugin.time, "sleep", lambda seconds: None)
    plugin.process("lost-answers")
    assert fake.metadata["/instances/lost-answers/metadata/PneumoscanResult"] == "NORMAL"
    assert len(keys) == 3 and len(set(keys)) == 1
    assert keys[0].startswith("orthanc-lost-answers-") and len(keys[0]) <= 255
    dicom = fake.RestApiGet("/instances/lost-answers/file")
    assert plugin.idempotency_key("lost-answers", dicom) == keys[0]  # a restart: the same
    assert plugin.idempotency_key("lost-answers", dicom + b"changed") != keys[0]
    assert plugin.idempotency_key("another", dicom) != keys[0]


def _next(outcomes: list):
    """Pop the next answer of a scripted service: raise it if it is an exception."""
    outcome = outcomes.pop(0)
    if isinstance(outcome, BaseException):
        raise outcome
    label, *checks = outcome
    return b"SR", label, as_checks(*checks), None


@pytest.mark.parametrize(
    ("setting", "with_overlay"),
    [("pneumonia", {"pa"}), ("all", {"pa", "repeat"}), ("off", set()), ("", {"pa"})],
)
def test_explanation_overlays_are_stored_in_the_study(
    orthanc, monkeypatch, setting: str, with_overlay: set
) -> None:
    """A radiologist reading in the PACS viewer sees the overlay as a Secondary Capture image
    of the study: by default for PNEUMONIA calls only (each costs about a second of CPU)."""
    monkeypatch.setenv("PNEUMOSCAN_OVERLAYS", setting)
    fake, sent, answers = FakeOrthanc(), [], {}
    plugin = load_plugin(monkeypatch, fake, sent, answers)
    fake.add("pa", ViewPosition="PA", SOPInstanceUID="1.2.3.4")
    fake.add("repeat", ViewPosition="PA")
    answers.update(pa=("PNEUMONIA", "typical"), repeat=("NORMAL", "typical"))
    plugin.drain(0)
    overlays = {
        name
        for name in ("pa", "repeat")
        if f"/instances/{name}/metadata/PneumoscanOverlay" in fake.metadata
    }
    assert overlays == with_overlay
    for request in fake.created:
        assert request["Parent"] == STUDY
        assert request["Tags"]["Modality"] == "OT"  # never scored by the plugin itself
        assert "NOT FOR DIAGNOSTIC USE" in request["Tags"]["SeriesDescription"]
        assert request["Content"].startswith("data:image/png;base64,")
    if "pa" in with_overlay:
        assert fake.metadata["/instances/pa/metadata/PneumoscanOverlay"] == "overlay-1"
        first = fake.created[0]
        assert "1.2.3.4" in first["Tags"]["ImageComments"]
        assert base64.b64decode(first["Content"].split(",", 1)[1]) == b"PNG of prediction-of-pa"


def test_a_failed_overlay_is_said_and_the_call_stands(orthanc, monkeypatch) -> None:
    tries = []

    def unreachable(prediction_id: str) -> bytes:
        tries.append(prediction_id)
        raise OSError("connection refused")

    monkeypatch.setattr(orthanc.plugin, "_get_overlay", unreachable)
    monkeypatch.setattr(orthanc.plugin.time, "sleep", lambda seconds: None)
    orthanc.fake.add("pa", ViewPosition="PA")
    orthanc.answers["pa"] = ("PNEUMONIA", "typical")
    orthanc.plugin.drain(0)
    assert orthanc.fake.metadata["/instances/pa/metadata/PneumoscanResult"] == "PNEUMONIA"
    assert study_metadata(orthanc.fake, "PneumoscanResult") == "PNEUMONIA"
    assert orthanc.fake.metadata["/instances/pa/metadata/PneumoscanOverlay"].startswith(
        "error: OSError"
    )
    assert len(tries) == 3  # tried PNEUMOSCAN_OVERLAY_TRIES times before giving up
    assert len(orthanc.fake.stored_srs) == 1 and not orthanc.fake.created


@pytest.mark.parametrize(
    ("failures", "stored"),
    [
        (["503", "refused"], True),  # busy, then restarting, then answered
        (["404"], False),  # a refusal is not tried again
    ],
)
def test_an_overlay_is_tried_again_while_the_service_is_busy(
    orthanc, monkeypatch, failures: list, stored: bool
) -> None:
    import urllib.error

    calls, pauses = [], []

    def flaky(prediction_id: str) -> bytes:
        calls.append(prediction_id)
        if len(calls) <= len(failures):
            failure = failures[len(calls) - 1]
            if failure == "refused":
                raise urllib.error.URLError(ConnectionRefusedError())
            raise urllib.error.HTTPError("u", int(failure), "x", {}, None)
        return b"PNG"

    monkeypatch.setattr(orthanc.plugin, "_get_overlay", flaky)
    monkeypatch.setattr(orthanc.plugin.time, "sleep", pauses.append)
    orthanc.fake.add("pa", ViewPosition="PA")
    orthanc.answers["pa"] = ("PNEUMONIA", "typical")
    orthanc.plugin.drain(0)
    outcome = orthanc.fake.metadata["/instances/pa/metadata/PneumoscanOverlay"]
    if stored:
        assert outcome == "overlay-1" and len(calls) == 3 and pauses == [2.0, 4.0]
    else:
        assert outcome.startswith("error: HTTPError") and len(calls) == 1 and pauses == []


@pytest.mark.parametrize("killed", ["fetching the overlay", "recording the stored overlay"])
def test_an_overlay_interrupted_by_a_kill_is_stored_once_after_the_restart(
    orthanc, monkeypatch, killed: str
) -> None:
    """Orthanc killed after the call was recorded but before the overlay was: the restart
    fetches the overlay (without sending the image again), or, if the overlay was stored just
    before the kill, records the one in the study instead of storing a second."""
    fake = orthanc.fake
    fake.add("pa", ViewPosition="PA", SOPInstanceUID="1.2.3.4")
    orthanc.answers["pa"] = ("PNEUMONIA", "typical")
    if killed == "fetching the overlay":

        def kill(prediction_id: str) -> bytes:
            raise Killed()

        monkeypatch.setattr(orthanc.plugin, "_get_overlay", kill)
    else:
        record = orthanc.plugin._put_optional_metadata

        def kill_on_outcome(resource: str, name: str, value: str) -> None:
            if value.startswith("overlay-"):
                raise Killed()
            record(resource, name, value)

        monkeypatch.setattr(orthanc.plugin, "_put_optional_metadata", kill_on_outcome)
    with pytest.raises(Killed):
        orthanc.plugin.drain(0)
    overlay_entry = "/instances/pa/metadata/PneumoscanOverlay"
    assert fake.metadata["/instances/pa/metadata/PneumoscanResult"] == "PNEUMONIA"
    assert fake.metadata[overlay_entry] == "pending: prediction-of-pa"
    assert fake.properties.get(orthanc.plugin.CURSOR_PROPERTY) is None  # not past "pa"

    restarted = load_plugin(monkeypatch, fake, orthanc.sent, orthanc.answers)
    restarted.drain(0)
    assert orthanc.sent == ["pa"]  # the image is not scored twice
    assert len(fake.stored_srs) == 1
    assert len(fake.created) == 1  # one overlay in the study, whichever the kill
    assert fake.metadata[overlay_entry] == "overlay-1"
    assert base64.b64decode(fake.created[0]["Content"].split(",", 1)[1]) == (
        b"PNG of prediction-of-pa"
    )
    restarted.drain(0)  # and a later pass leaves it alone
    assert len(fake.created) == 1 and orthanc.sent == ["pa"]


def test_the_plugin_derives_the_sr_uid_as_the_service_does(orthanc) -> None:
    from app.reports import sr_uid

    prediction_id = "0123456789abcdef0123456789abcdef"
    assert orthanc.plugin.sr_uid(prediction_id) == sr_uid(prediction_id)
    assert orthanc.plugin.sr_uid("prediction-of-pa") is None
    assert orthanc.plugin.sr_uid(None) is None


@pytest.mark.parametrize("killed", ["before", "after"])
def test_a_kill_around_storing_the_sr_leaves_one_sr_and_the_call_recorded(
    orthanc, monkeypatch, killed: str
) -> None:
    """Orthanc killed while storing an SR: if the SR did not reach Orthanc, the image is
    scored again after the restart; if it did, the call is recorded from what the plugin kept
    (global property), without sending the image again. Either way the study holds one SR, its
    call and its checks are recorded, and the overlay is stored once."""
    fake = orthanc.fake
    fake.add("pa", ViewPosition="PA", SOPInstanceUID="1.2.3.4")
    orthanc.answers["pa"] = ("PNEUMONIA", "typical", "within")
    fake.uid_of_sr = lambda body: "uid-prediction-of-" + body.decode().removeprefix("SR for ")
    monkeypatch.setattr(orthanc.plugin, "sr_uid", lambda prediction_id: f"uid-{prediction_id}")
    fake.kill_on_sr = killed
    with pytest.raises(Killed):
        orthanc.plugin.drain(0)
    assert "/instances/pa/metadata/PneumoscanResult" not in fake.metadata
    assert fake.properties.get(orthanc.plugin.CURSOR_PROPERTY) is None  # not past "pa"

    fake.kill_on_sr = None
    restarted = load_plugin(monkeypatch, fake, orthanc.sent, orthanc.answers)
    monkeypatch.setattr(restarted, "sr_uid", lambda prediction_id: f"uid-{prediction_id}")
    restarted.drain(0)
    assert orthanc.sent == (["pa"] if killed == "after" else ["pa", "pa"])
    assert fake.stored_srs == [b"SR for pa"]
    assert fake.metadata["/instances/pa/metadata/PneumoscanResult"] == "PNEUMONIA"
    assert fake.metadata["/instances/pa/metadata/PneumoscanInputCheck"] == "typical"
    assert fake.metadata["/instances/pa/metadata/PneumoscanAgeCheck"] == "within"
    assert study_metadata(fake, "PneumoscanResult") == "PNEUMONIA"
    assert len(fake.created) == 1
    assert fake.properties[restarted.PENDING_PROPERTY] == ""
    restarted.drain(0)  # and a later pass leaves it alone
    assert len(fake.stored_srs) == 1 and len(fake.created) == 1
