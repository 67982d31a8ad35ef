"""`python -m training attach-ood`: publish an existing version again, as the store's next
version, with the out-of-distribution score (training.ood) added to its signature.

The weights, temperature and threshold are the source version's own: the Keras model is rebuilt
from the card's architecture and its variables are copied from the SavedModel by name, and the
new version's probabilities are checked against the source's on the validation part before
and after publishing. The score's statistics come from the source's recorded patient split
(`split.json`): fitted on its train part, thresholded on its validation part.
"""

from __future__ import annotations

import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from app.model_store import verify_version
from training import architectures, ood
from training.data import DataError, load_arrays, scan
from training.evaluate import savedmodel_predict, split_part
from training.export import export_version, save_savedmodel
from training.train import git_commit

log = logging.getLogger("pneumoscan.training")

# Probabilities may differ by float rounding only (the card's temperature has 6 decimals).
PARITY_TOLERANCE = 1e-5
COPIED = ("split.json", "training_curves.png", "roc.png", "confusion_matrix.png", "reliability.png")


def rebuild(version_dir: Path, card: dict) -> keras.Model:
    """The version's Keras model with its SavedModel's variables, matched by name."""
    training = card.get("training", {})
    model = architectures.build(
        card["architecture"],
        width=training.get("width", architectures.DEFAULT_WIDTH),
        input_pool=training.get("input_pool", architectures.DEFAULT_INPUT_POOL),
    )
    saved = tf.saved_model.load(str(version_dir))
    by_name = {variable.name.removesuffix(":0"): variable for variable in saved.variables}
    missing = [weight.path for weight in model.weights if weight.path not in by_name]
    if missing:
        raise DataError(f"{version_dir}: no variables for {', '.join(missing[:5])}")
    for weight in model.weights:
        weight.assign(by_name[weight.path].numpy())
    return model


def attach(source: Path, model_dir: Path, data: Path) -> tuple[int, Path]:
    card = verify_version(source)
    model = rebuild(source, card)
    extractor = ood.feature_model(model)
    if extractor is None:
        raise DataError(f"{card['architecture']} has no pooled feature layer to score")
    samples = scan(data, "train")
    x_train, _ = load_arrays(split_part(samples, source, "train"))
    x_val, _ = load_arrays(split_part(samples, source, "validation"))
    x_test, _ = load_arrays(split_part(samples, source, "internal_test"))
    log.info(
        "split parts: %d train, %d validation, %d internal test",
        *map(len, (x_train, x_val, x_test)),
    )

    temperature = float(card["temperature"])
    reference = savedmodel_predict(source)(x_val)

    log.info("fitting the out-of-distribution score")
    seed = int(card.get("training", {}).get("seed", 0))
    stats, section = ood.fit_and_report(extractor, x_train, x_val, x_test, seed)
    log.info("threshold %.3f, flag rates %s", stats.threshold, section["flag_rates"])
    with tempfile.TemporaryDirectory() as scratch:  # check the graph before publishing it
        save_savedmodel(model, temperature, Path(scratch), stats)
        candidate = savedmodel_predict(Path(scratch))(x_val)
    before = float(np.max(np.abs(candidate - reference)))
    if before > PARITY_TOLERANCE:
        raise DataError(f"the new graph differs from {source} by {before:.2e} in P(pneumonia)")
    derived = {
        key: value
        for key, value in card.items()
        if key not in ("version", "input", "output", "outputs", "signature", "ood")
    }
    derived["derived_from"] = {
        "path": f"{source.parent.name}/{source.name}",
        "version": card.get("version"),
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "change": "same weights, temperature and threshold; the signature also returns ood_score",
        "max_abs_difference_p_pneumonia_validation": before,
        "git_commit": git_commit(),
    }
    derived["ood"] = section
    version, folder = export_version(
        model_dir,
        model,
        temperature,
        derived,
        ood=stats,
        copy_files={name: source / name for name in COPIED if (source / name).exists()},
    )
    log.info("published %s: P(pneumonia) within %.1e of %s on validation", folder, before, source)
    return version, folder


def main_attach(args) -> int:
    from app.errors import ModelStoreError

    try:
        _version, folder = attach(
            Path(args.source), Path(args.model_store) / args.model_name, Path(args.data)
        )
    except (DataError, ModelStoreError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(folder)
    return 0
