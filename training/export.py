"""Export a trained Keras model as a SavedModel version with its card, plots and checksums."""

from __future__ import annotations

import json
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from app.imaging import TARGET_SIZE
from app.lite_runtime import TFLITE_FILE, differences, mismatches, parity_probe
from app.model_store import CARD, CHECKSUMS, publish_version, verify_version
from training.ood import FeatureStats, feature_model

log = logging.getLogger("pneumoscan.training")

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


def write_tflite(folder: Path, ood_threshold: float | None = None) -> dict:
    """Convert the SavedModel in `folder` to `model.tflite` (float32, no quantisation: the same
    graph for LiteRT, which the service runs faster) and check that both give the same outputs
    on the probe batch (`app.lite_runtime.mismatches`, with the version's out-of-distribution
    flag threshold); returns the card's `tflite` section. Raises ValueError on a mismatch,
    after removing the file."""
    log.info("converting the SavedModel to %s for LiteRT", TFLITE_FILE)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(folder), signature_keys=[SIGNATURE])
    (folder / TFLITE_FILE).write_bytes(converter.convert())

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # a platform without LiteRT wheels: TensorFlow's own copy
        Interpreter = tf.lite.Interpreter

    probe = parity_probe()
    reference = tf.saved_model.load(str(folder)).signatures[SIGNATURE](pixels=tf.constant(probe))
    runner = Interpreter(model_path=str(folder / TFLITE_FILE)).get_signature_runner(SIGNATURE)
    lite = runner(pixels=probe)
    expected = {name: value.numpy() for name, value in reference.items()}
    problems = mismatches(lite, expected, ood_threshold)
    if problems:
        (folder / TFLITE_FILE).unlink()
        raise ValueError(
            f"{TFLITE_FILE} did not give the SavedModel's answers on the probe batch: "
            + "; ".join(problems)
        )
    found = differences(lite, expected)
    # The SavedModel's answers, kept so that the service can check the file as it loads it
    # without TensorFlow (float32 values, which JSON's doubles hold exactly).
    reference_answers = {name: value.tolist() for name, value in expected.items()}
    return {
        "file": TFLITE_FILE,
        "runtime": "LiteRT (TensorFlow Lite), XNNPACK on CPU; float32, not quantised",
        "converted_with": f"tensorflow {tf.__version__}",
        "max_difference_on_probe": found,
        "difference": "max |tflite - savedmodel| / max(1, |savedmodel|)",
        "probe_images": len(probe),
        "probe_reference": reference_answers,
    }


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
    tflite: bool = True,
) -> tuple[int, Path]:
    """Publish the model as the next version of `model_dir`; returns (version, folder). With
    `tflite`, the version also holds the same graph as `model.tflite` (write_tflite), unless
    LiteRT's answers on the probe batch differ from the SavedModel's: then the version is
    published without it (the service runs its SavedModel) and the card says why."""

    def write(folder: Path, version: int) -> None:
        save_savedmodel(model, temperature, folder, ood, extractor)
        full = {
            **card,
            "version": version,
            "input": INPUT_SPEC,
            "output": OUTPUT_SPEC,
            "signature": SIGNATURE,
        }
        if tflite:
            try:
                full["tflite"] = write_tflite(folder, None if ood is None else ood.threshold)
            except Exception as exc:  # noqa: BLE001 - the SavedModel is published either way
                (folder / TFLITE_FILE).unlink(missing_ok=True)
                log.warning("%s; publishing without it", exc)
                full["tflite"] = {"file": None, "not_written": f"{type(exc).__name__}: {exc}"}
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


def attach_tflite(source: Path, model_dir: Path) -> tuple[int, Path]:
    """Publish `source` again as the next version of `model_dir`, unchanged (its SavedModel,
    plots and split byte for byte) but with `model.tflite` added; returns (version, folder)."""
    card = verify_version(source)
    if card.get("signature", SIGNATURE) != SIGNATURE:
        raise ValueError(f"{source}: signature {card['signature']!r} is not {SIGNATURE!r}")

    def write(folder: Path, version: int) -> None:
        for path in source.iterdir():
            if path.name in (CARD, CHECKSUMS, TFLITE_FILE):
                continue
            if path.is_dir():
                shutil.copytree(path, folder / path.name)
            else:
                shutil.copy2(path, folder / path.name)
        derived = {k: v for k, v in card.items() if k not in ("version", "tflite")}
        derived["derived_from"] = {
            "path": f"{source.parent.name}/{source.name}",
            "version": card.get("version"),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "change": "the same SavedModel, byte for byte; model.tflite added for LiteRT",
            "git_commit": _git_commit(),
            "previous": card.get("derived_from"),
        }
        derived["tflite"] = write_tflite(folder, card.get("ood", {}).get("threshold"))
        derived["version"] = version
        (folder / CARD).write_text(json.dumps(derived, indent=2, default=_json_default) + "\n")

    return publish_version(model_dir, write)


def main_attach_tflite(args) -> int:
    from app.errors import ModelStoreError

    try:
        model_dir = Path(args.model_store) / args.model_name
        _version, folder = attach_tflite(Path(args.source), model_dir)
    except (ValueError, ModelStoreError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(folder)
    return 0


def _git_commit() -> str | None:
    from training.train import git_commit

    return git_commit()


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
