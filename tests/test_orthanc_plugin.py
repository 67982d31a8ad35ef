"""The Orthanc plugin's study logic, run against an in-memory stand-in for Orthanc's `orthanc`
module (the real Orthanc round trip is `python -m integrations.orthanc.e2e`, run by `.ci/run`)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from app.dicom import NOT_FRONTAL_VIEWS

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

    def add(self, instance_id: str, **tags: str) -> None:
        self.instances[instance_id] = {
            "Modality": "DX",
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1",
            **tags,
        }

    def RestApiGet(self, path: str):
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

    def RestApiPost(self, path: str, body: bytes) -> None:
        assert path == "/instances"
        self.stored_srs.append(body)

    def LogWarning(self, message: str) -> None:
        pass

    def RegisterOnChangeCallback(self, callback) -> None:
        pass


@pytest.fixture
def orthanc(monkeypatch: pytest.MonkeyPatch):
    fake = FakeOrthanc()
    monkeypatch.setitem(sys.modules, "orthanc", fake)
    spec = importlib.util.spec_from_file_location("pneumoscan_plugin_under_test", PLUGIN)
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    sent: list[str] = []
    answers: dict[str, tuple[str, str] | Exception] = {}

    def post_predict(dicom_bytes: bytes):
        instance_id = dicom_bytes.decode().removeprefix("DICM ")
        sent.append(instance_id)
        answer = answers[instance_id]
        if isinstance(answer, Exception):
            raise answer
        label, check = answer
        return b"SR for " + instance_id.encode(), label, check

    monkeypatch.setattr(plugin, "_post_predict", post_predict)
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
    assert not should({"Modality": "CT"})
    assert not should({"Modality": "SR", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.34"})


def test_the_plugin_skips_exactly_the_views_the_service_refuses(orthanc) -> None:
    assert orthanc.plugin.NOT_FRONTAL_VIEWS == NOT_FRONTAL_VIEWS
