"""`python -m training evaluate`: score a model-store version on a Kaggle-layout folder."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from training.augmentation import PERTURBATIONS, perturb
from training.data import DataError, load_arrays, scan
from training.metrics import classification_report

log = logging.getLogger("training")
Predict = Callable[[np.ndarray], np.ndarray]


def load_savedmodel(version_dir: Path) -> tuple[Predict, dict]:
    """Load a store version with plain `tf.saved_model.load`; returns (predict, card)."""
    from app.model_store import verify_version

    card = verify_version(version_dir)
    return savedmodel_predict(version_dir), card


def savedmodel_predict(folder: Path) -> Predict:
    """P(pneumonia) from a SavedModel folder's `serving_default`, in batches (no checksum
    verification: also for a graph not yet published)."""
    import tensorflow as tf

    serve = tf.saved_model.load(str(folder)).signatures["serving_default"]

    def predict(images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        out = [
            serve(pixels=tf.constant(images[i : i + batch_size]))["probabilities"].numpy()[:, 1]
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    return predict


def robustness_report(
    predict: Predict, images: np.ndarray, labels: np.ndarray, threshold: float, seed: int = 0
) -> dict[str, dict]:
    """Metrics under each fixed acquisition perturbation, plus the worst case over them."""
    report = {"clean": _short(classification_report(labels, predict(images), threshold))}
    for name in PERTURBATIONS:
        scored = classification_report(labels, predict(perturb(images, name, seed)), threshold)
        report[name] = _short(scored)
    perturbed = [v for k, v in report.items() if k != "clean"]
    report["worst"] = {
        key: min(v[key] for v in perturbed)
        for key in ("auc", "accuracy", "sensitivity", "specificity")
    }
    return report


def _short(report: dict) -> dict:
    return {k: report[k] for k in ("auc", "accuracy", "sensitivity", "specificity", "ece")}


def in_split(samples: list, names: list[str]) -> list:
    """The samples named in a split.json list ("CLASS/file.jpeg")."""
    chosen = set(names)
    return [s for s in samples if f"{s.path.parent.name}/{s.path.name}" in chosen]


def originals_report(
    predict: Predict, version_dir: Path, originals: Path, threshold: float
) -> dict:
    """Score the full-resolution originals of the internal-test patients through the service's
    decode path (reduced-scale JPEG decode, then the one resize)."""
    samples = scan(originals, "train")
    split_file = version_dir / "split.json"
    note = "all originals (no split.json in the version)"
    if split_file.exists():
        held_out = json.loads(split_file.read_text()).get("internal_test", [])
        samples = in_split(samples, held_out)
        note = "originals whose patients are in the internal test split"
    if not samples:
        return {"n": 0, "note": note}
    images, labels = load_arrays(samples)
    return {"note": note, **classification_report(labels, predict(images), threshold)}


def split_part(samples: list, version_dir: Path, part: str) -> list:
    """Keep the samples that the version's recorded patient split put in `part`."""
    split_file = version_dir / "split.json"
    if not split_file.exists():
        raise DataError(f"{version_dir} has no split.json, so --part {part} cannot be used")
    parts = json.loads(split_file.read_text())
    if part not in parts:
        raise DataError(f"--part must be one of {', '.join(parts)}, not {part!r}")
    kept = in_split(samples, parts[part])
    if not kept:
        raise DataError(f"none of the {part} files of {version_dir} are in the data folder")
    return kept


def evaluate(
    model: Path,
    data: Path,
    split: str | None = "test",
    plots: Path | None = None,
    robustness: bool = False,
    originals: Path | None = None,
    part: str | None = None,
) -> dict:
    predict, card = load_savedmodel(model)
    samples = scan(data, split)
    if part:
        samples = split_part(samples, model, part)
    images, labels = load_arrays(samples)
    threshold = float(card["threshold"])
    p = predict(images)
    result = {
        "model": {"name": card.get("name"), "version": card.get("version")},
        "data": str(data),
        **({"part": part} if part else {}),
        **classification_report(labels, p, threshold),
    }
    if robustness:
        # The same seeded perturbations the training run reported with.
        seed = int(card.get("training", {}).get("seed", 0))
        result["robustness"] = robustness_report(predict, images, labels, threshold, seed=seed)
    if originals:
        result["originals"] = originals_report(predict, model, originals, threshold)
    if plots:
        from training.plots import write_plots

        plots.mkdir(parents=True, exist_ok=True)
        write_plots(
            plots,
            {"labels": labels, "p_pneumonia": p, "threshold": threshold, "title": f"({data.name})"},
        )
    return result


def main_evaluate(args) -> int:
    try:
        result = evaluate(
            Path(args.model),
            Path(args.data),
            args.split,
            Path(args.plots) if args.plots else None,
            args.robustness,
            Path(args.originals) if args.originals else None,
            args.part,
        )
    except DataError as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(json.dumps(result))
    return 0
