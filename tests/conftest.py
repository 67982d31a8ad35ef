"""Shared fixtures: a tiny model store built in-process, real radiographs, app clients."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
API_KEY = "test-key-aaaaaaaaaaaaaaaa"
OTHER_KEY = "test-key-bbbbbbbbbbbbbbbb"


def build_tiny_model(bias: float = 0.0):
    """A deterministic few-weight model that still depends on image content."""
    import keras
    import numpy as np

    inputs = keras.Input((224, 224, 1))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.AveragePooling2D(28)(x)
    x = keras.layers.Flatten()(x)
    logit = keras.layers.Dense(1)(x)
    model = keras.Model(inputs, logit)
    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 1.0, (64, 1)).astype("float32")
    model.layers[-1].set_weights([kernel, np.array([bias], "float32")])
    return model


def tiny_card(threshold: float = 0.5, architecture: str = "tiny-test", **extra) -> dict:
    """The least model.json a test version needs (export adds the input contract)."""
    return {
        "name": "pneumonia",
        "architecture": architecture,
        "class_names": ["NORMAL", "PNEUMONIA"],
        "threshold": threshold,
        "temperature": 1.0,
        **extra,
    }


def publish_tiny(model_dir: Path, bias: float = 0.0, threshold: float = 0.5) -> Path:
    from training.export import export_version

    card = {**tiny_card(threshold), "name": model_dir.name}
    _, folder = export_version(model_dir, build_tiny_model(bias), 1.0, card)
    return folder


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store with one tiny version: <store>/pneumonia/1."""
    store = tmp_path_factory.mktemp("store")
    publish_tiny(store / "pneumonia")
    return store


def fixture_bytes(relative: str) -> bytes:
    return (FIXTURES / relative).read_bytes()


@pytest.fixture
def normal_jpeg() -> bytes:
    return fixture_bytes("originals/NORMAL2-IM-0744-0001.jpeg")


@pytest.fixture
def pneumonia_jpeg() -> bytes:
    return fixture_bytes("originals/person495_bacteria_2094.jpeg")


def make_settings(store: Path, data_dir: Path, **overrides):
    from app.settings import Settings

    values = {
        "model_store": store,
        "data_dir": data_dir,
        "api_keys": f"{API_KEY},{OTHER_KEY}",
        "poll_seconds": 0.2,
        "log_level": "INFO",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def client(tiny_store: Path, tmp_path: Path) -> Iterator:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(make_settings(tiny_store, tmp_path / "data"))) as test_client:
        test_client.headers["X-API-Key"] = API_KEY
        yield test_client
