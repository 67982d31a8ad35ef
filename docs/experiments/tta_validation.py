"""Would test-time augmentation of v2 help? Scored by the selection rule, on validation only.

The candidates registered in selection_rule.txt (2026-12-02): two geometric views per image
(training/views.py), v2's calibrated logits averaged over them, then a temperature and threshold
of their own fitted as `train` fits them (selection set = validation + the seeded shifted copy,
sensitivity >= 0.97). Printed per candidate (and for v2 alone, the reference): the rule's mean
balanced accuracy, mean AUC, worst specificity and threshold, then the mean balanced accuracy
over the non-geometric conditions (the guard registered with the candidates) and the per-condition
balanced accuracy. `--test NAME` also reports one candidate's internal test, for the record.

    cd docs/experiments && ../../.venv/bin/python tta_validation.py --test A > tta_validation.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from training.augmentation import PERTURBATIONS, perturb, shifted_copy  # noqa: E402
from training.data import load_arrays, scan  # noqa: E402
from training.evaluate import load_savedmodel, split_part  # noqa: E402
from training.metrics import (  # noqa: E402
    classification_report,
    fit_temperature,
    logit,
    screening_threshold,
    selection_score,
    sigmoid,
)
from training.views import VIEW_SETS, identity  # noqa: E402

GEOMETRIC = {"zoom_in_16pct", "border_10pct", "aspect_80pct"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--version", default="model_store/pneumonia/2")
    parser.add_argument("--test", default="", help="candidate whose internal test is reported")
    args = parser.parse_args()
    folder = ROOT / args.version
    predict, _ = load_savedmodel(folder)
    train = scan(ROOT.parent / "shared/data/chest_xray", "train")
    x, y = load_arrays(split_part(train, folder, "validation"))
    x_sel = np.concatenate([x, shifted_copy(x, seed=42)])
    y_sel = np.concatenate([y, y])
    conditions = {"clean": x, **{name: perturb(x, name, 42) for name in PERTURBATIONS}}
    candidates = {"v2 alone": (identity,), **VIEW_SETS}

    def scored(views, images: np.ndarray) -> np.ndarray:
        return np.mean([logit(predict(np.asarray(view(images)))) for view in views], axis=0)

    def calibration(views) -> tuple[float, float]:
        z = scored(views, x_sel)
        temperature = fit_temperature(y_sel, z)
        return temperature, screening_threshold(y_sel, sigmoid(z / temperature), 0.97)

    print(f"version: {args.version}; validation n={len(y)}")
    print("candidate: rule (mean balanced accuracy, mean AUC, worst specificity, threshold);")
    print("  non-geometric mean balanced accuracy; per-condition balanced accuracy")
    for name, views in candidates.items():
        temperature, threshold = calibration(views)
        reports = {
            c: classification_report(y, sigmoid(scored(views, images) / temperature), threshold)
            for c, images in conditions.items()
        }
        balanced, auc, worst = selection_score(reports.values())
        per = {c: round((r["sensitivity"] + r["specificity"]) / 2, 4) for c, r in reports.items()}
        other = statistics.mean(v for c, v in per.items() if c not in GEOMETRIC)
        print(
            name,
            (round(balanced, 4), round(auc, 4), round(worst, 3), round(float(threshold), 4)),
            f"temperature {temperature:.3f}",
            flush=True,
        )
        print("  non-geometric", round(other, 4), per, flush=True)
    if args.test:
        views = VIEW_SETS[args.test]
        temperature, threshold = calibration(views)
        x_test, y_test = load_arrays(split_part(train, folder, "internal_test"))
        report = classification_report(
            y_test, sigmoid(scored(views, x_test) / temperature), threshold
        )
        print("internal test of", args.test, "(for the record):", report)


if __name__ == "__main__":
    main()
