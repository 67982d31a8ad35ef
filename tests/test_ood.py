"""The out-of-distribution score: its statistics, the exported output, and what the service does
with it (response, FHIR, SR, audit row, metric), with a model whose flag is known in advance."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.errors import ModelStoreError
from app.imaging import load_path
from app.main import create_app
from app.records import PredictionRecord, RecordStore
from tests.conftest import API_KEY, FIXTURES, make_settings, tiny_card
from tests.utils.dicom_factory import make_dicom
from training import ood
from training.architectures import build_sepcnn
from training.export import export_version

NORMAL = FIXTURES / "chest_xray" / "NORMAL" / "NORMAL2-IM-0744-0001.jpeg"
PNEUMONIA = FIXTURES / "chest_xray" / "PNEUMONIA" / "person495_bacteria_2094.jpeg"


def pixels(path: Path) -> np.ndarray:
    return load_path(str(path))  # the service's preprocessing: uint8 (224, 224)


def test_distance_in_numpy_and_in_the_graph_agree_and_threshold_is_the_quantile() -> None:
    import tensorflow as tf

    rng = np.random.default_rng(0)
    spread = ([1, 2, 3, 0.5, 1, 1e-4], [5, 1, 1])  # one near-constant direction
    train = [rng.normal(size=(400, len(s))) * s for s in spread]
    selection = [rng.normal(size=(200, len(s))) * s for s in spread]
    stats = ood.fit(train, selection, quantile=0.9)
    first, second = stats.layers
    assert first.distance(first.mean[None])[0] == pytest.approx(0.0, abs=1e-9)
    # Each layer is scaled by its own quantile, and the score is the larger ratio.
    assert first.scale == pytest.approx(np.quantile(first.distance(selection[0]), 0.9))
    expected = np.maximum(
        first.distance(selection[0]) / first.scale, second.distance(selection[1]) / second.scale
    )
    np.testing.assert_allclose(stats.distance(selection), expected)
    assert stats.threshold == pytest.approx(np.quantile(expected, 0.9))
    assert np.mean(stats.distance(selection) > stats.threshold) == pytest.approx(0.1, abs=0.01)
    probe = [rng.normal(size=(5, len(s))) * 3 for s in spread]
    graph = stats.tf_distance([tf.constant(p, tf.float32) for p in probe]).numpy()
    np.testing.assert_allclose(graph, stats.distance(probe), rtol=1e-3)
    # Far along a direction the training data never varied in is far, not a numerical blow-up.
    far = [np.array([[0, 0, 0, 0, 0, 5.0]]), np.zeros((1, 3))]
    assert np.isfinite(stats.distance(far)).all() and stats.distance(far)[0] > stats.threshold


def test_synthetic_mistakes_are_what_they_say() -> None:
    images = np.stack([pixels(NORMAL), pixels(PNEUMONIA)])
    made = ood.synthetic_inputs(images, seed=3)
    assert set(made) == {
        "inverted",
        "rotated_90",
        "upside_down",
        "tiles_shuffled",
        "uniform_noise",
        "gradient",
    }
    for value in made.values():
        assert value.shape == images.shape and value.dtype == np.uint8
    np.testing.assert_array_equal(made["inverted"], 255 - images)
    np.testing.assert_array_equal(made["upside_down"][:, ::-1], images)
    np.testing.assert_array_equal(np.rot90(made["rotated_90"], -1, axes=(1, 2)), images)
    for shuffled, image in zip(made["tiles_shuffled"], images, strict=True):
        assert not np.array_equal(shuffled, image)
        np.testing.assert_array_equal(np.sort(shuffled, axis=None), np.sort(image, axis=None))


def block_means_model():
    """Pooled features = the mean brightness of 16 blocks (a sepcnn with untrained batch-norm
    statistics maps every radiograph to nearly the same features)."""
    import keras

    inputs = keras.Input((224, 224, 1))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.AveragePooling2D(56)(x)
    x = keras.layers.Reshape((1, 1, 16))(x)
    pooled = keras.layers.GlobalAveragePooling2D(name=ood.FINAL_LAYER)(x)
    logit = keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros")(pooled)
    return keras.Model(inputs, logit)


def test_sepcnn_exposes_its_pooled_features() -> None:
    extractor = ood.feature_model(build_sepcnn(width=8))
    assert extractor is not None
    pooled, logit = extractor(np.zeros((2, 224, 224, 1), np.float32))
    assert ood.layer_names(extractor) == ["s2_1_relu", "gap"]
    assert [p.shape for p in pooled] == [(2, 5 * 8), (2, 7 * 8)] and logit.shape == (2, 1)


@pytest.fixture(scope="module")
def known_flag_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A small model whose score is the distance to the NORMAL fixture's features, with the
    threshold half way to the PNEUMONIA fixture's: NORMAL is typical, PNEUMONIA flagged."""
    model = block_means_model()
    extractor = ood.feature_model(model)
    assert extractor is not None
    (pooled,) = ood.features(extractor, np.stack([pixels(NORMAL), pixels(PNEUMONIA)])[..., None])
    normal, pneumonia = pooled
    gaussian = ood.LayerGaussian(normal, np.eye(len(normal)), 1.0)
    far = float(gaussian.distance(pneumonia[None])[0])
    assert far > 0.05
    stats = ood.FeatureStats((gaussian,), far / 2)
    store = tmp_path_factory.mktemp("ood-store")
    card = tiny_card(0.5, "block-means-test", ood={"threshold": stats.threshold})
    export_version(store / "pneumonia", model, 1.0, card, ood=stats)
    return store, far


def test_flag_reaches_the_response_fhir_sr_audit_row_and_metric(
    known_flag_store: tuple[Path, float], tmp_path: Path
) -> None:
    store, far = known_flag_store
    app = create_app(make_settings(store, tmp_path / "data"))
    with TestClient(app, headers={"X-API-Key": API_KEY}) as client:
        typical = client.post("/predict", files={"file": ("n.jpeg", NORMAL.read_bytes())})
        assert typical.status_code == 200, typical.text
        body = typical.json()["out_of_distribution"]
        assert body["flagged"] is False and body["score"] == pytest.approx(0.0, abs=1e-2)
        assert body["threshold"] == pytest.approx(far / 2)

        flagged = client.post("/predict", files={"file": ("p.jpeg", PNEUMONIA.read_bytes())})
        result = flagged.json()
        assert result["out_of_distribution"]["flagged"] is True
        assert result["out_of_distribution"]["score"] == pytest.approx(far, rel=1e-3)
        # The flag changes nothing about the probabilities or the label.
        assert set(result["probabilities"]) == {"NORMAL", "PNEUMONIA"}

        record = app.state.services.records.get(result["prediction_id"])
        assert record.ood_score == pytest.approx(far, rel=1e-3)

        fhir = client.post(
            "/predict",
            files={"file": ("p.jpeg", PNEUMONIA.read_bytes())},
            headers={"Accept": "application/fhir+json"},
        ).json()
        assert "unlike the training radiographs" in fhir["conclusion"]
        observation = next(r for r in fhir["contained"] if r["resourceType"] == "Observation")
        assert any("unreliable" in note["text"] for note in observation["note"])
        quiet = client.post(
            "/predict",
            files={"file": ("n.jpeg", NORMAL.read_bytes())},
            headers={"Accept": "application/fhir+json"},
        ).json()
        assert "unlike the training radiographs" not in quiet["conclusion"]

        gray = np.asarray(Image.open(PNEUMONIA).convert("L"))
        sr = client.post(
            "/predict",
            files={"file": ("p.dcm", make_dicom(gray))},
            headers={"Accept": "application/dicom"},
        )
        assert sr.status_code == 200, sr.text
        assert sr.headers["x-input-check"] == "flagged"  # what the Orthanc plugin records
        text = str(pydicom.dcmread(io.BytesIO(sr.content)))
        assert "Out-of-distribution score" in text and "Out-of-distribution flag" in text

        metrics = client.get("/metrics").text
        line = 'pneumoscan_out_of_distribution_total{model_version="1"}'
        count = next(float(row.split()[-1]) for row in metrics.splitlines() if row.startswith(line))
        assert count == 3.0  # the flagged JPEG, its FHIR twin and the DICOM; not the NORMAL ones


def test_a_model_without_the_score_answers_null(client) -> None:
    response = client.post("/predict", files={"file": ("n.jpeg", NORMAL.read_bytes())})
    assert response.status_code == 200
    assert response.json()["out_of_distribution"] is None
    assert "pneumoscan_out_of_distribution_total{" not in client.get("/metrics").text


def test_score_without_a_card_threshold_is_not_served(
    known_flag_store: tuple[Path, float], tmp_path: Path
) -> None:
    from app.classifier import load_version
    from app.model_store import CARD, write_checksums

    source = known_flag_store[0] / "pneumonia" / "1"
    broken = tmp_path / "pneumonia" / "1"
    shutil.copytree(source, broken)
    card = json.loads((broken / CARD).read_text())
    del card["ood"]
    (broken / CARD).write_text(json.dumps(card))
    write_checksums(broken)
    with pytest.raises(ModelStoreError, match=r"ood\.threshold"):
        load_version(broken.parent, 1)


def test_old_audit_database_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "pneumoscan.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        """CREATE TABLE predictions (id TEXT PRIMARY KEY, created REAL NOT NULL, key_id TEXT NOT
        NULL, model_name TEXT NOT NULL, model_version INTEGER NOT NULL, p_normal REAL NOT NULL,
        p_pneumonia REAL NOT NULL, label TEXT NOT NULL, threshold REAL NOT NULL, image_sha256
        TEXT NOT NULL, input_format TEXT NOT NULL, input_bytes INTEGER NOT NULL, width INTEGER
        NOT NULL, height INTEGER NOT NULL, study_uid TEXT, series_uid TEXT, sop_uid TEXT);
        INSERT INTO predictions VALUES ('old', 1.0, 'k', 'pneumonia', 1, 0.9, 0.1, 'NORMAL', 0.5,
        'ab', 'JPEG', 10, 224, 224, NULL, NULL, NULL);"""
    )
    old.commit()
    old.close()
    store = RecordStore(tmp_path, 3600)
    assert store.get("old").ood_score is None
    record = PredictionRecord(
        "new",
        2.0,
        "k",
        "pneumonia",
        3,
        0.2,
        0.8,
        "PNEUMONIA",
        0.5,
        "cd",
        "PNG",
        5,
        300,
        200,
        ood_score=21.5,
    )
    store.add(record, np.zeros((224, 224), np.uint8))
    assert store.get("new") == record
    store.close()
    assert RecordStore(tmp_path, 3600).count() == 2  # reopening migrates nothing twice
