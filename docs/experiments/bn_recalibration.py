"""Batch-norm recalibration, tested after the fact on the draws of v1's recipe (validation only).

For each version: rebuild the Keras model, load the version's weights, then score the selection
rule three ways, each with temperature and threshold refitted as `train` fits them on the
selection set (validation + seeded shifted copy): as exported; with batch-norm statistics
recomputed over one pass of the version's train part, clean; and augmented as in training.
The internal test split is not touched. Registered in selection_rule.txt (2026-11-28 00:37).

    cd docs/experiments && ../../.venv/bin/python bn_recalibration.py > bn_recalibration.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import tensorflow as tf  # noqa: E402

from training import architectures  # noqa: E402
from training.augmentation import augment_fn, shifted_copy  # noqa: E402
from training.batchnorm import recalibrate_batchnorm  # noqa: E402
from training.data import load_arrays, scan  # noqa: E402
from training.evaluate import robustness_report, split_part  # noqa: E402
from training.metrics import (  # noqa: E402
    fit_temperature,
    screening_threshold,
    selection_score,
    sigmoid,
)
from training.train import predict_logits  # noqa: E402

VERSIONS = {
    "v1 (init seed 42, patience 8)": ROOT / "model_store/pneumonia/1",
    "run 7 (init seed 1, patience 8)": ROOT / "runs/store/pneumonia/7",
    "run 9 (init seed 2, patience 8)": ROOT / "runs/store/pneumonia/9",
    "run 12 (init seed 3, patience 8)": ROOT / "runs/store/pneumonia/12",
    "run 8 (init seed 1, whole schedule)": ROOT / "runs/store/pneumonia/8",
    "run 13 (init seed 2, whole schedule)": ROOT / "runs/store/pneumonia/13",
    "run 14 (init seed 3, whole schedule)": ROOT / "runs/store/pneumonia/14",
    "run 15 (init seed 4, whole schedule)": ROOT / "runs/store/pneumonia/15",
}
SEED = 42  # the split's seed: the shifted copy and the perturbations


def load_keras(folder: Path):
    model = architectures.build("sepcnn")
    saved = {v.name.split(":")[0]: v for v in tf.saved_model.load(str(folder)).variables}
    for weight in model.weights:
        weight.assign(saved[weight.path].numpy())
    return model


def score(model, x_val, y_val) -> tuple[float, float, float]:
    x_sel = np.concatenate([x_val, shifted_copy(x_val, seed=SEED)])
    y_sel = np.concatenate([y_val, y_val])
    logits = predict_logits(model, x_sel)
    temperature = fit_temperature(y_sel, logits)
    threshold = screening_threshold(y_sel, sigmoid(logits / temperature))

    def predict(images: np.ndarray) -> np.ndarray:
        return sigmoid(predict_logits(model, images) / temperature)

    report = robustness_report(predict, x_val, y_val, threshold, seed=SEED)
    return selection_score(v for k, v in report.items() if k != "worst")


def main() -> None:
    samples = scan(ROOT.parent / "shared/data/chest_xray", "train")
    print("version: rule (mean balanced accuracy, mean AUC, worst specificity)")
    gains: dict[str, list[float]] = {"clean": [], "augmented": []}
    for label, folder in VERSIONS.items():
        x_val, y_val = load_arrays(split_part(samples, folder, "validation"))
        x_train, y_train = load_arrays(split_part(samples, folder, "train"))
        model = load_keras(folder)
        base = score(model, x_val, y_val)
        row = [f"{label}: exported {tuple(round(v, 4) for v in base)}"]
        for variant in ("clean", "augmented"):
            model = load_keras(folder)
            ds = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(
                len(x_train), seed=SEED
            )
            ds = ds.batch(64)
            if variant == "augmented":
                ds = ds.map(augment_fn(SEED, "basic"))
            else:
                ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y))
            recalibrate_batchnorm(model, (images for images, _ in ds))
            result = score(model, x_val, y_val)
            gains[variant].append(result[0] - base[0])
            row.append(f"{variant} {tuple(round(v, 4) for v in result)}")
        print("; ".join(row), flush=True)
    for variant, values in gains.items():
        raised = sum(g > 0 for g in values)
        print(
            f"{variant}: rule raised in {raised} of {len(values)}, "
            f"mean change {np.mean(values):+.4f}, range {min(values):+.4f} to {max(values):+.4f}"
        )


if __name__ == "__main__":
    main()
