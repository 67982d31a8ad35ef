"""The served version on both runtimes (LiteRT on model.tflite, TensorFlow on the SavedModel):
do they give the same answers on every radiograph here, and how fast is each, in alternating
rounds?

python -m benchmarks.runtime_parity [--rounds 5]

Answers: every image of the shared train and val splits (224 copies) and the full-resolution
originals, through the service's decode: the largest difference in P(pneumonia) and in the
out-of-distribution score, and how many labels (at the card's threshold) or flags differ.
Speed: batch 1 and batch 32 per call, one caller, the service's thread setting.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from app.classifier import configure_threads, load_version
from app.imaging import load_path
from app.model_store import list_versions
from app.settings import Settings
from benchmarks.common import SHARED, default_store, report
from benchmarks.compare_versions import per_call_ms


def images() -> np.ndarray:
    paths = sorted((SHARED / "chest_xray").glob("*/*/*.jpeg")) + sorted(
        (SHARED / "originals").rglob("*.jpeg")
    )
    return np.stack([load_path(str(path)) for path in paths])[..., None]


def scores(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    parts = [model.score(x[i : i + 64]) for i in range(0, len(x), 64)]
    probs = np.concatenate([p for p, _ in parts])[:, 1]
    ood = None if parts[0][1] is None else np.concatenate([o for _, o in parts])
    return probs, ood


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    settings = Settings()
    configure_threads(settings.model_threads)
    model_dir = default_store() / settings.model_name
    version = max(list_versions(model_dir))
    lite = load_version(model_dir, version, "auto", settings.model_threads)
    tensorflow = load_version(model_dir, version, "savedmodel", settings.model_threads)
    if lite.runtime != "tflite":
        raise SystemExit(f"version {version} has no model.tflite (or LiteRT is not installed)")

    x = images()
    p_lite, ood_lite = scores(lite, x)
    p_tf, ood_tf = scores(tensorflow, x)
    threshold = lite.threshold
    answers = {
        "images": len(x),
        "max_abs_difference_p_pneumonia": float(np.max(np.abs(p_lite - p_tf))),
        "labels_differing": int(np.sum((p_lite >= threshold) != (p_tf >= threshold))),
    }
    if ood_lite is not None and ood_tf is not None:
        answers["max_relative_difference_ood"] = float(
            np.max(np.abs(ood_lite - ood_tf) / np.maximum(1.0, np.abs(ood_tf)))
        )
        flag = lite.ood_threshold
        answers["ood_flags_differing"] = int(np.sum((ood_lite > flag) != (ood_tf > flag)))

    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, 224, 224, 1), dtype=np.uint8)
    many = rng.integers(0, 256, (32, 224, 224, 1), dtype=np.uint8)
    speed: dict[str, list[float]] = {k: [] for k in ("b1_tflite", "b1_tf", "b32_tflite", "b32_tf")}
    for model in (lite, tensorflow):
        per_call_ms(model, many, 2)
    for _ in range(args.rounds):
        for model, name in ((lite, "tflite"), (tensorflow, "tf")):
            speed[f"b1_{name}"].append(per_call_ms(model, one, 100))
            speed[f"b32_{name}"].append(32000 / per_call_ms(model, many, 10))
    medians = {key: round(statistics.median(values), 2) for key, values in speed.items()}
    result = {"version": version, "threads": settings.model_threads, **answers, **medians}
    report(
        f"version {version}: LiteRT (model.tflite) against TensorFlow (SavedModel)",
        [
            ("images compared (train + val 224 copies, originals)", answers["images"]),
            (
                "max |difference| in P(pneumonia)",
                f"{answers['max_abs_difference_p_pneumonia']:.2e}",
            ),
            ("labels differing at the card's threshold", answers["labels_differing"]),
            (
                "max relative difference in the ood score; flags differing",
                f"{answers.get('max_relative_difference_ood', float('nan')):.2e}; "
                f"{answers.get('ood_flags_differing', '-')}",
            ),
            (
                f"batch 1 ms per call, median of {args.rounds} rounds: LiteRT, TensorFlow",
                f"{medians['b1_tflite']}, {medians['b1_tf']}",
            ),
            (
                "batch 32 images/s: LiteRT, TensorFlow",
                f"{medians['b32_tflite']}, {medians['b32_tf']}",
            ),
        ],
        result,
    )


if __name__ == "__main__":
    main()
