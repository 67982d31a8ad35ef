"""`python -m training ensemble`: publish the average of two or more store versions as the
store's next version, in one SavedModel.

Each member's calibrated logit (its logit divided by its own temperature) is averaged; the
average gets its own temperature and screening threshold, fitted exactly as `train` fits a
single model's (selection set = the validation part + its seeded shifted copy, pneumonia
sensitivity >= 0.97), and the out-of-distribution score of the first member. The members must
come from the same patient split (identical `split.json` and data manifest): otherwise one
member's training images would sit in another's validation or internal test part. Members are
rebuilt from their cards with their SavedModels' variables, and every member's rebuilt
probabilities are checked against its own SavedModel before anything is published; the new
graph is checked against the Keras ensemble the card's metrics come from.
"""

from __future__ import annotations

import json
import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import keras
import numpy as np

from app.model_store import verify_version
from training import architectures, ood
from training.attach_ood import PARITY_TOLERANCE, rebuild
from training.augmentation import shifted_copy
from training.data import CLASS_NAMES, DataError, load_arrays, scan
from training.evaluate import savedmodel_predict, split_part
from training.export import export_version, save_savedmodel
from training.metrics import sigmoid
from training.train import calibrate_and_score, predict_logits, provenance

log = logging.getLogger("pneumoscan.training")

MIN_SENSITIVITY = 0.97


def check_members(members: list[Path]) -> list[dict]:
    """The members' verified cards; refuses fewer than two, repeats and mixed patient splits."""
    if len(members) < 2:
        raise DataError("an ensemble needs at least two member versions")
    resolved = [member.resolve() for member in members]
    if len(set(resolved)) != len(resolved):
        raise DataError("a member version is named twice")
    cards = [verify_version(member) for member in members]
    splits = [(member / "split.json").read_bytes() for member in members]
    manifests = [card.get("data", {}).get("manifest_sha256") for card in cards]
    if len(set(splits)) != 1 or len(set(manifests)) != 1 or manifests[0] is None:
        raise DataError(
            "the members come from different patient splits (split.json or data manifest "
            "differ): one member's training patients would be in another's validation or test"
        )
    for member, card in zip(members, cards, strict=True):
        if card.get("architecture") not in architectures.ARCHITECTURES:
            raise DataError(f"{member}: a {card.get('architecture')!r} version cannot be a member")
    return cards


def rebuild_member(member: Path, card: dict, index: int, x_check: np.ndarray) -> keras.Model:
    """The member's Keras model under a name of its own, checked against its SavedModel."""
    model = rebuild(member, card)
    expected = savedmodel_predict(member)(x_check)
    got = sigmoid(predict_logits(model, x_check) / float(card["temperature"]))
    gap = float(np.max(np.abs(got - expected)))
    if gap > PARITY_TOLERANCE:
        raise DataError(f"{member}: the rebuilt model differs from its SavedModel by {gap:.2e}")
    return keras.Model(model.input, model.output, name=f"member_{index}")


def build_ensemble(
    members: list[keras.Model], temperatures: list[float]
) -> tuple[keras.Model, keras.Model | None]:
    """(model: pixels -> mean calibrated logit, extractor: pixels -> ([first member's pooled
    features], the same logit) for the out-of-distribution score, or None)."""
    inputs = keras.Input(architectures.INPUT_SHAPE, name="pixels")
    features = ood.feature_model(members[0])
    if features is not None:
        pooled, first = features(inputs)
    else:
        pooled, first = None, members[0](inputs)
    logits = [first] + [member(inputs) for member in members[1:]]
    calibrated = [
        keras.layers.Rescaling(1.0 / t, name=f"calibrate_{i}")(z)
        for i, (z, t) in enumerate(zip(logits, temperatures, strict=True))
    ]
    mean = keras.layers.Average(name="mean_logit")(calibrated)
    model = keras.Model(inputs, mean, name="ensemble")
    extractor = keras.Model(inputs, [pooled, mean], name="features") if pooled else None
    return model, extractor


def member_record(member: Path, card: dict) -> dict:
    training = card.get("training", {})
    return {
        "path": str(member),
        "version": card.get("version"),
        "created": card.get("created"),
        "architecture": card["architecture"],
        "temperature": card["temperature"],
        "git_commit": card.get("git_commit"),
        "training": {k: v for k, v in training.items() if k != "history"},
        "validation": card.get("metrics", {}).get("validation"),
    }


def ensemble(members: list[Path], model_dir: Path, data: Path) -> tuple[int, Path]:
    cards = check_members(members)
    samples = scan(data, "train")
    x_train, _ = load_arrays(split_part(samples, members[0], "train"))
    x_val, y_val = load_arrays(split_part(samples, members[0], "validation"))
    x_test, y_test = load_arrays(split_part(samples, members[0], "internal_test"))
    log.info(
        "split parts: %d train, %d validation, %d internal test",
        *map(len, (x_train, x_val, x_test)),
    )
    seed = int(cards[0].get("training", {}).get("seed", 42))
    x_sel = np.concatenate([x_val, shifted_copy(x_val, seed=seed)])
    y_sel = np.concatenate([y_val, y_val])

    log.info("rebuilding %d members", len(members))
    keras_members = [
        rebuild_member(member, card, i, x_val)
        for i, (member, card) in enumerate(zip(members, cards, strict=True))
    ]
    temperatures = [float(card["temperature"]) for card in cards]
    model, extractor = build_ensemble(keras_members, temperatures)

    temperature, threshold, metrics, p_test = calibrate_and_score(
        model, (x_sel, y_sel), (x_val, y_val), (x_test, y_test), MIN_SENSITIVITY, seed
    )

    stats, ood_section = None, None
    if extractor is not None:
        log.info("fitting the out-of-distribution score on the first member's features")
        first_features = ood.feature_model(keras_members[0])
        stats, ood_section = ood.fit_and_report(first_features, x_train, x_val, x_test, seed)
        ood_section["features_of"] = f"member 0 ({members[0]})"

    reference = sigmoid(predict_logits(model, x_val) / temperature)
    with tempfile.TemporaryDirectory() as scratch:  # check the graph before publishing it
        save_savedmodel(model, temperature, Path(scratch), stats, extractor=extractor)
        candidate = savedmodel_predict(Path(scratch))(x_val)
    gap = float(np.max(np.abs(candidate - reference)))
    if gap > PARITY_TOLERANCE:
        raise DataError(f"the exported graph differs from the ensemble by {gap:.2e}")

    records = [member_record(m, c) for m, c in zip(members, cards, strict=True)]
    fit_seconds = sum(float(r["training"].get("fit_seconds", 0.0)) for r in records)
    card = {
        "name": model_dir.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "intended_use": cards[0].get(
            "intended_use",
            "Screening assistance only: a clinician reads every image. "
            "Not a diagnosis and not a medical device.",
        ),
        "architecture": "ensemble",
        "parameters": int(model.count_params()),
        "flops_per_image": sum(int(c.get("flops_per_image", 0)) for c in cards),
        "class_names": list(CLASS_NAMES),
        "threshold": round(float(threshold), 6),
        "threshold_rule": f"highest threshold with pneumonia sensitivity >= {MIN_SENSITIVITY} on "
        "the selection set (validation + seeded shifted copy), for the averaged logit",
        "temperature": round(float(temperature), 6),
        "metrics": metrics,
        "members": records,
        "training": {
            "kind": f"average of {len(members)} versions' calibrated logits",
            "members": [r["path"] for r in records],
            "seed": seed,
            "fit_seconds": round(fit_seconds, 1),
            "fit_seconds_note": "the members' fitting times added up",
            "epochs_run": max(int(r["training"].get("epochs_run", 0)) for r in records),
            "host": records[0]["training"].get("host"),
            "parity_max_abs_difference_p_pneumonia_validation": gap,
        },
        "data": cards[0]["data"],
        **({"population": cards[0]["population"]} if "population" in cards[0] else {}),
        **provenance(ood_section),
    }
    plots = {
        "labels": y_test,
        "p_pneumonia": p_test,
        "threshold": threshold,
        "title": "(internal test)",
    }
    version, folder = export_version(
        model_dir,
        model,
        temperature,
        card,
        plots,
        ood=stats,
        extractor=extractor,
        copy_files={"split.json": members[0] / "split.json"},
    )
    log.info(
        "published %s: %d members, internal test %s",
        folder,
        len(members),
        {k: metrics["internal_test"][k] for k in ("auc", "accuracy", "sensitivity", "specificity")},
    )
    return version, folder


def main_ensemble(args) -> int:
    from app.errors import ModelStoreError

    try:
        _version, folder = ensemble(
            [Path(m) for m in args.members],
            Path(args.model_store) / args.model_name,
            Path(args.data),
        )
    except (DataError, ModelStoreError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(json.dumps({"published": str(folder)}))
    return 0
