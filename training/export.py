"""Export a trained Keras model as a SavedModel version with its card, plots and checksums."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from app.imaging import TARGET_SIZE
from app.model_store import CARD, publish_version
from training.ood import FeatureStats, feature_model

SIGNATURE = "serving_default"
INPUT_SPEC = {
    "name": "pixels",
    "dtype": "uint8",
    "shape": [None, TARGET_SIZE, TARGET_SIZE, 1],
    "channels": "grayscale",
    "value_range": [0, 255],
    "resize": "stretch, Pillow bilinear, from one 8-bit grayscale channel",
}
OUTPUT_SPEC = {"name": "probabilities", "dtype": "float32", "shape": [None, 2]}
OOD_OUTPUT_SPEC = {"name": "ood_score", "dtype": "float32", "shape": [None]}


def save_savedmodel(
    model: keras.Model,
    temperature: float,
    folder: Path,
    ood: FeatureStats | None = None,
    extractor: keras.Model | None = None,
) -> None:
    """SavedModel whose `serving_default` takes uint8 [N,224,224,1] and returns calibrated
    probabilities [N,2] ordered (NORMAL, PNEUMONIA); the temperature is baked in. With `ood`,
    the same call also returns `ood_score` [N] (training.ood), computed on the pooled features
    of `extractor` (default: the model's own, `training.ood.feature_model`), which must also
    return the model's logit."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    inv_t = tf.constant(1.0 / temperature, tf.float32)
    if ood is None:
        extractor = None
    elif extractor is None:
        extractor = feature_model(model)
    else:
        archive.track(extractor)
    if ood is not None and extractor is None:
        raise ValueError(f"{model.name} has no pooled feature layer for an ood_score")

    def serve(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        x = tf.cast(pixels, tf.float32)
        if extractor is None:
            logit = model(x, training=False)[:, 0] * inv_t
        else:
            pooled, raw = extractor(x, training=False)  # pooled: one tensor per feature layer
            logit = raw[:, 0] * inv_t
        p = tf.sigmoid(logit)
        outputs = {"probabilities": tf.stack([1.0 - p, p], axis=1)}
        if extractor is not None and ood is not None:
            outputs["ood_score"] = ood.tf_distance(pooled)
        return outputs

    archive.add_endpoint(
        name=SIGNATURE,
        fn=serve,
        input_signature=[tf.TensorSpec([None, TARGET_SIZE, TARGET_SIZE, 1], tf.uint8, "pixels")],
    )
    archive.write_out(str(folder), verbose=False)


def export_version(
    model_dir: Path,
    model: keras.Model,
    temperature: float,
    card: dict,
    plots: dict[str, object] | None = None,
    extra_files: dict[str, str] | None = None,
    ood: FeatureStats | None = None,
    copy_files: dict[str, Path] | None = None,
    extractor: keras.Model | None = None,
) -> tuple[int, Path]:
    """Publish the model as the next version of `model_dir`; returns (version, folder)."""

    def write(folder: Path, version: int) -> None:
        save_savedmodel(model, temperature, folder, ood, extractor)
        full = {
            **card,
            "version": version,
            "input": INPUT_SPEC,
            "output": OUTPUT_SPEC,
            "signature": SIGNATURE,
        }
        if ood is not None:
            full["outputs"] = [OUTPUT_SPEC, OOD_OUTPUT_SPEC]
        (folder / CARD).write_text(json.dumps(full, indent=2, default=_json_default) + "\n")
        for name, text in (extra_files or {}).items():
            (folder / name).write_text(text)
        for name, source in (copy_files or {}).items():
            shutil.copy2(source, folder / name)
        if plots:
            from training.plots import write_plots

            write_plots(folder, plots)

    return publish_version(model_dir, write)


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
