"""Several draws of one recipe, side by side: how far apart are two recipes once each has been
trained more than once?

Reads the model cards kept in this folder (and v1's validation report) and prints, per recipe,
every draw's selection-rule score (mean over the 11 validation conditions of balanced accuracy
at the version's own threshold), its worst validation specificity and its mean validation AUC,
then each recipe's mean and range. The internal-test columns are printed for the record only:
nothing here chooses on them.

    cd docs/experiments && ../../.venv/bin/python recipe_draws.py > recipe_draws.txt
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from training.metrics import selection_score  # noqa: E402

# recipe -> draws (label, card or report); v1 itself is init seed 42 (= --seed)
RECIPES: dict[str, list[tuple[str, Path]]] = {
    "v1 recipe (patience 8)": [
        ("init seed 42 = v1", HERE / "v1-validation-robustness.json"),
        ("init seed 1", HERE / "v1-recipe-init-seed-1.model.json"),
        ("init seed 2", HERE / "v1-recipe-init-seed-2.model.json"),
        ("init seed 3", HERE / "v1-recipe-init-seed-3.model.json"),
    ],
    "whole schedule (patience 40)": [
        ("init seed 1", HERE / "v1-recipe-init-seed-1-whole-schedule.model.json"),
        ("init seed 2", HERE / "whole-schedule-init-seed-2.model.json"),
        ("init seed 3", HERE / "whole-schedule-init-seed-3.model.json"),
        ("init seed 4", HERE / "whole-schedule-init-seed-4.model.json"),
    ],
    "--swa-epochs 10 (whole schedule)": [
        ("init seed 1", HERE / "swa-init-seed-1.model.json"),
        ("init seed 2", HERE / "swa-init-seed-2.model.json"),
        ("init seed 3", HERE / "swa-init-seed-3.model.json"),
        # v2's own command re-run on session 9's AMD EPYC VM: a reproduction, not a candidate
        ("seed 1, EPYC VM", HERE / "swa-init-seed-1-amd-epyc.model.json"),
    ],
    "--swa-epochs 20 (whole schedule)": [
        ("seed 1, Xeon VM", HERE / "swa20-init-seed-1.model.json"),
    ],
    "--epochs 80 --swa-epochs 20": [
        ("seed 1, EPYC VM", HERE / "long80-swa20-init-seed-1.model.json"),
    ],
    "--input-pool 3 (74 px, SWA 10)": [
        ("seed 1, EPYC VM", HERE / "input-pool3-init-seed-1.model.json"),
        ("seed 1, Xeon VM", HERE / "input-pool3-init-seed-1-xeon.model.json"),
    ],
    "--width 40 --swa-epochs 10": [
        ("init seed 1", HERE / "width40-init-seed-1.model.json"),
        ("init seed 2", HERE / "width40-init-seed-2.model.json"),
    ],
    "--augmentation erase (SWA 10)": [
        ("seed 1, Xeon VM", HERE / "erase-init-seed-1.model.json"),
    ],
    "--augmentation framing (SWA 10)": [
        ("init seed 1", HERE / "framing-init-seed-1.model.json"),
    ],
    "--swa-lr 5e-4 (SWA 10)": [
        ("init seed 1", HERE / "swa-lr-init-seed-1.model.json"),
    ],
    "--weight-decay 1e-2 (SWA 10)": [
        ("init seed 1", HERE / "weight-decay-init-seed-1.model.json"),
    ],
    "--mixup 0.2 --swa-epochs 10": [
        ("seed 1, Xeon VM", HERE / "mixup-swa-init-seed-1.model.json"),
    ],
    "--consistency 12 (SWA 10)": [
        ("seed 1, Xeon VM", HERE / "consistency-init-seed-1.model.json"),
        ("seed 2, Xeon VM", HERE / "consistency-init-seed-2.model.json"),
    ],
    "--consistency 12 --epochs 20": [
        ("seed 1, Xeon VM", HERE / "consistency-20-epochs-init-seed-1.model.json"),
    ],
    "--mixup 0.2 (patience 8)": [
        ("init seed 42", HERE / "mixup.model.json"),
        ("init seed 1", HERE / "mixup-init-seed-1.model.json"),
        ("init seed 2", HERE / "mixup-init-seed-2.model.json"),
    ],
    "--label-smoothing 0.1 (patience 8)": [
        ("init seed 42", HERE / "label-smoothing-loss-stop.model.json"),
    ],
    "--label-smoothing 0.1 --patience 40": [
        ("init seed 42", HERE / "label-smoothing-full-schedule.model.json"),
    ],
    "--teacher v2 --distill 0.5 (SWA 10)": [
        ("init seed 2", HERE / "distill-init-seed-2.model.json"),
    ],
}


def conditions(path: Path) -> dict[str, dict]:
    data = json.loads(path.read_text())
    rows = data["robustness"] if "robustness" in data else data["metrics"]["robustness_validation"]
    return {name: row for name, row in rows.items() if name != "worst"}


def internal_test(path: Path) -> dict | None:
    if path.name == "v1-validation-robustness.json":
        path = ROOT / "model_store/pneumonia/1/model.json"
    return json.loads(path.read_text())["metrics"].get("internal_test")


def main() -> None:
    print(
        f"{'recipe':36} {'draw':18} {'rule':>7} {'worst spec':>10} {'mean AUC':>9}"
        f" {'| int. test AUC':>15} {'acc':>6}"
    )
    for recipe, draws in RECIPES.items():
        scores = []
        for label, path in draws:
            if not path.exists():
                print(f"{recipe:36} {label:18} (not trained)")
                continue
            rows = conditions(path)
            rule, auc, worst = selection_score(rows.values())
            test = internal_test(path) or {}
            test_auc, test_acc = test.get("auc", float("nan")), test.get("accuracy", float("nan"))
            scores.append(rule)
            print(
                f"{recipe:36} {label:18} {rule:7.4f} {worst:10.3f} {auc:9.4f}"
                f" | {test_auc:13.4f} {test_acc:6.3f}"
            )
        if scores:
            print(
                f"{recipe:36} {'mean (range)':18} {statistics.mean(scores):7.4f}"
                f"   ({min(scores):.4f}-{max(scores):.4f}, n={len(scores)})"
            )


if __name__ == "__main__":
    main()
