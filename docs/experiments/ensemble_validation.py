"""Would averaging store versions help? Scored by the selection rule, on validation only.

Every version of v1's seed and patient split (model_store/pneumonia/1 and the candidates kept in
runs/store/pneumonia/<n>) is run on the validation patients, clean and under the 10 fixed
perturbations. An ensemble averages the versions' calibrated logits, then gets its own
temperature and threshold fitted as `train` fits them (selection set = validation + the seeded
shifted copy, sensitivity >= 0.97). Printed per combination: the rule's mean balanced accuracy,
mean AUC, worst specificity and the threshold. The internal test split is not touched, except
by `--test` (below), which is never used to pick a combination.

    cd docs/experiments && ../../.venv/bin/python ensemble_validation.py > ensemble_validation.txt
    ../../.venv/bin/python ensemble_validation.py 16 17 18 19 20 --test 16,17,18 \
        > ensemble_swa_validation.txt

Arguments name the runs/store/pneumonia versions to combine with v1 (default: 1-6, the
candidates of the first file above). `--test A,B,C` also reports one combination's internal test
(registered beforehand in selection_rule.txt; for the record, never a choice): its temperature
and threshold come from the selection set as above.
"""

from __future__ import annotations

import argparse
import itertools
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="*", type=int, default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--test", default="", help="comma-separated runs: report internal test")
    args = parser.parse_args()
    versions = {"v1": ROOT / "model_store/pneumonia/1"}
    for run in args.runs:
        versions[f"c{run}"] = ROOT / "runs/store/pneumonia" / str(run)
    train = scan(ROOT.parent / "shared/data/chest_xray", "train")
    samples = split_part(train, versions["v1"], "validation")
    x, y = load_arrays(samples)
    x_sel = np.concatenate([x, shifted_copy(x, seed=42)])
    y_sel = np.concatenate([y, y])
    conditions = {"clean": x, **{name: perturb(x, name, 42) for name in PERTURBATIONS}}
    logits, predictors = {}, {}
    for key, folder in versions.items():
        predict, _ = load_savedmodel(folder)
        predictors[key] = predict
        logits[key] = {"sel": logit(predict(x_sel))}
        logits[key].update({c: logit(predict(images)) for c, images in conditions.items()})

    def calibration(keys: tuple[str, ...]) -> tuple[float, float]:
        sel = np.mean([logits[k]["sel"] for k in keys], axis=0)
        temperature = fit_temperature(y_sel, sel)
        return temperature, screening_threshold(y_sel, sigmoid(sel / temperature), 0.97)

    def rule(keys: tuple[str, ...]) -> tuple[float, float, float, float]:
        temperature, threshold = calibration(keys)
        reports = []
        for condition in conditions:
            z = np.mean([logits[k][condition] for k in keys], axis=0)
            reports.append(classification_report(y, sigmoid(z / temperature), threshold))
        balanced, auc, worst_specificity = selection_score(reports)
        return (
            round(balanced, 4),
            round(auc, 4),
            round(worst_specificity, 3),
            round(float(threshold), 4),
        )

    print("versions:", {k: str(v.relative_to(ROOT)) for k, v in versions.items()})
    print("combination: (mean balanced accuracy, mean AUC, worst specificity, threshold)")
    for size in (1, 2, 3):
        for keys in itertools.combinations(versions, size):
            print(keys, rule(keys), flush=True)
    if args.test:
        keys = tuple(f"c{run}" for run in args.test.split(","))
        temperature, threshold = calibration(keys)
        x_test, y_test = load_arrays(split_part(train, versions["v1"], "internal_test"))
        z = np.mean([logit(predictors[k](x_test)) for k in keys], axis=0)
        report = classification_report(y_test, sigmoid(z / temperature), threshold)
        print("internal test of", keys, "(for the record):", report)


if __name__ == "__main__":
    main()
