"""The shipped model store loads through the service and gets real radiographs right.

The official val split (16 images, never used by the training command, which splits only the
official train split) is the check: every image is scored, and the shipped model must get most of
each class right, including at least one real NORMAL and one real PNEUMONIA."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.imaging import load_path
from app.main import create_app
from app.model_store import list_versions, verify_version
from tests.conftest import API_KEY, FIXTURES, make_settings

SHIPPED = Path(__file__).resolve().parent.parent / "model_store"


def test_shipped_store_is_valid_and_documented() -> None:
    versions = list_versions(SHIPPED / "pneumonia")
    assert versions, "model_store/pneumonia has no version"
    folder = SHIPPED / "pneumonia" / str(max(versions))
    card = verify_version(folder)
    assert card["architecture"] == "sepcnn"
    assert 0 < card["threshold"] < 1 and card["temperature"] > 0
    assert card["metrics"]["internal_test"]["n"] > 400
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 20 * 1024 * 1024
    assert json.loads((folder / "split.json").read_text())["internal_test"]


@pytest.fixture(scope="module")
def shipped_client(tmp_path_factory: pytest.TempPathFactory):
    settings = make_settings(SHIPPED, tmp_path_factory.mktemp("shipped-data"))
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
        yield client


def test_shipped_model_on_the_official_val_split(shipped_client) -> None:
    correct = {"NORMAL": 0, "PNEUMONIA": 0}
    totals = {"NORMAL": 0, "PNEUMONIA": 0}
    for label in correct:
        for path in sorted((FIXTURES / "val" / label).iterdir()):
            response = shipped_client.post(
                "/predict", files={"file": (path.name, path.read_bytes())}
            )
            assert response.status_code == 200, response.text
            totals[label] += 1
            correct[label] += response.json()["label"] == label
    assert totals == {"NORMAL": 8, "PNEUMONIA": 8}
    assert correct["PNEUMONIA"] >= 7, correct
    assert correct["NORMAL"] >= 5, correct


def test_shipped_model_on_full_resolution_originals(shipped_client) -> None:
    """Originals through the full decode path agree with the answers for their 224 copies."""
    for label in ("NORMAL", "PNEUMONIA"):
        for path in sorted((FIXTURES / "chest_xray" / label).iterdir()):
            small = shipped_client.post("/predict", files={"file": ("a", path.read_bytes())})
            original = (FIXTURES / "originals" / path.name).read_bytes()
            full = shipped_client.post("/predict", files={"file": ("b", original)})
            p_small = small.json()["probabilities"]["PNEUMONIA"]
            p_full = full.json()["probabilities"]["PNEUMONIA"]
            assert abs(p_small - p_full) < 0.1, (path.name, p_small, p_full)


def png_bytes(gray: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(gray).save(out, format="PNG")
    return out.getvalue()


def test_shipped_model_flags_non_radiographs_and_not_the_val_split(shipped_client) -> None:
    """The out-of-distribution flag (training.ood): noise and a smooth ramp, which the model
    alone would score with confident probabilities, are flagged; real radiographs are not."""
    rng = np.random.default_rng(0)
    ramp = np.tile(np.linspace(0, 255, 640).astype(np.uint8), (480, 1))
    for gray in (rng.integers(0, 256, (480, 640), dtype=np.uint8), ramp):
        body = shipped_client.post("/predict", files={"file": ("x.png", png_bytes(gray))}).json()
        assert body["out_of_distribution"]["flagged"] is True, body
    for path in sorted((FIXTURES / "val").rglob("*.jpeg")):
        body = shipped_client.post("/predict", files={"file": ("v", path.read_bytes())}).json()
        assert body["out_of_distribution"]["flagged"] is False, (path.name, body)


def test_shipped_version_is_v2_with_the_score_added() -> None:
    """v3 and v4 were published by `training attach-ood` from v2 (v4 with the two-layer score):
    the same probabilities as v2, plus `ood_score`. v5 and v6 are v4 republished by `training
    attach-tflite`: the same SavedModel, byte for byte, and model.tflite (v6 also with the
    SavedModel's answers on the probe batch, so the service checks it without TensorFlow)."""
    import tensorflow as tf

    store = SHIPPED / "pneumonia"
    images = np.stack([load_path(str(p)) for p in sorted((FIXTURES / "val").rglob("*.jpeg"))])[
        ..., None
    ]
    v2 = tf.saved_model.load(str(store / "2")).signatures["serving_default"]
    reference = v2(pixels=tf.constant(images))
    assert "ood_score" not in reference
    assert max(list_versions(store)) == 6
    for version in ("3", "4", "5", "6"):
        card = verify_version(store / version)
        source = card["derived_from"]
        if version in ("5", "6"):
            source = source["previous"]
        assert source["version"] == 2 and card["ood"]["threshold"] > 0
        out = tf.saved_model.load(str(store / version)).signatures["serving_default"](
            pixels=tf.constant(images)
        )
        np.testing.assert_allclose(
            out["probabilities"].numpy(), reference["probabilities"].numpy(), atol=1e-6
        )
        assert out["ood_score"].shape == (len(images),)
    assert card["ood"]["feature_layers"] == ["s2_1_relu", "gap"]
    assert card["derived_from"]["version"] == 4
    for version in ("5", "6"):
        for name in ("saved_model.pb", "variables/variables.data-00000-of-00001"):
            assert (store / version / name).read_bytes() == (store / "4" / name).read_bytes()
    assert card["tflite"]["max_difference_on_probe"]["probabilities"] < 1e-5
    assert set(card["tflite"]["probe_reference"]) == {"probabilities", "ood_score"}
    from training.card import render

    shown = render(store / "6")
    assert "Republished from version 4" in shown and "That one from version 2" in shown
    assert "Runtimes: the SavedModel and `model.tflite`" in shown


def test_shipped_model_is_served_by_litert_with_the_savedmodels_answers() -> None:
    """The service's loader runs v6's model.tflite (checked against the SavedModel's answers
    on the probe batch, recorded in its card, as it loads); on real radiographs both runtimes
    agree."""
    from app.classifier import load_version

    store = SHIPPED / "pneumonia"
    lite = load_version(store, 6)
    reference = load_version(store, 6, runtime="savedmodel")
    assert (lite.runtime, reference.runtime) == ("tflite", "savedmodel")
    paths = sorted((FIXTURES / "val").rglob("*.jpeg")) + sorted(FIXTURES.glob("originals/*"))
    images = np.stack([load_path(str(p)) for p in paths])[..., None]
    (p_lite, ood_lite), (p_ref, ood_ref) = lite.score(images), reference.score(images)
    np.testing.assert_allclose(p_lite, p_ref, atol=1e-5)
    np.testing.assert_allclose(ood_lite, ood_ref, rtol=1e-4)
