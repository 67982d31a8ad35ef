"""The out-of-distribution score variants compared in session 10, on validation-derived data only.

Uses v2's weights (rebuilt as `training attach-ood` does) and v2's recorded patient split.
For each variant it prints the share flagged of the clean validation part, of the validation
part under the ten seeded perturbations (mean / worst), and of synthetic mistakes made from
200 validation images. The internal test part is not read.

    cd docs/experiments && ../../.venv/bin/python ood_variants.py > ood_variants.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from app.model_store import verify_version  # noqa: E402
from training import ood  # noqa: E402
from training.attach_ood import rebuild  # noqa: E402
from training.augmentation import PERTURBATIONS, perturb, shifted_copy  # noqa: E402
from training.data import load_arrays, scan  # noqa: E402
from training.evaluate import split_part  # noqa: E402

SOURCE = ROOT / "model_store" / "pneumonia" / "2"
DATA = ROOT.parent / "shared" / "data" / "chest_xray"
LAYERS = ("stem_relu", "s0_0_relu", "s1_1_relu", "s2_1_relu", "gap")
SEED = 42  # v2's --seed, as attach-ood uses


def main() -> None:
    card = verify_version(SOURCE)
    extractor = ood.feature_model(rebuild(SOURCE, card), LAYERS)
    samples = scan(DATA, "train")
    x_train, _ = load_arrays(split_part(samples, SOURCE, "train"))
    x_val, _ = load_arrays(split_part(samples, SOURCE, "validation"))

    def feats(images: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(LAYERS, ood.features(extractor, images), strict=True))

    train = feats(x_train)
    train_shifted = feats(np.concatenate([x_train, shifted_copy(x_train, SEED)]))
    validation = feats(x_val)
    selection = feats(np.concatenate([x_val, shifted_copy(x_val, SEED)]))
    perturbed = {name: feats(perturb(x_val, name, SEED)) for name in PERTURBATIONS}
    base = x_val[:200].reshape(-1, 224, 224)
    synthetic = {
        name: feats(images[..., None])
        for name, images in ood.synthetic_inputs(base, seed=SEED).items()
    }

    def row(label: str, layers: tuple[str, ...], fit_on: dict, threshold_on: dict) -> None:
        stats = ood.fit([fit_on[n] for n in layers], [threshold_on[n] for n in layers])

        def rate(features: dict[str, np.ndarray]) -> float:
            scores = stats.distance([features[n] for n in layers])
            return float(np.mean(scores > stats.threshold))

        shifted = [rate(f) for f in perturbed.values()]
        worst = max(perturbed, key=lambda name: rate(perturbed[name]))
        mistakes = " / ".join(f"{rate(f):.2f}" for f in synthetic.values())
        print(
            f"| {label} | {rate(validation):.1%} | {np.mean(shifted):.1%} / {max(shifted):.1%} "
            f"({worst}) | {mistakes} |"
        )

    print("synthetic mistakes, in order:", ", ".join(synthetic))
    print("| variant | clean validation | perturbed validation: mean / worst | mistakes |")
    print("|---|---|---|---|")
    row("gap: fit on train, threshold on validation", ("gap",), train, validation)
    row("gap: fit on train, threshold on validation + shifted", ("gap",), train, selection)
    row(
        "gap: fit on train + shifted, threshold on selection (v3)",
        ("gap",),
        train_shifted,
        selection,
    )
    ood.SHRINKAGE = 1e-2
    row("gap, ridge 1e-2: fit on train, threshold on validation", ("gap",), train, validation)
    ood.SHRINKAGE = 1e-3
    for name in LAYERS[:-1]:
        row(f"{name} alone, as v3", (name,), train_shifted, selection)
    row("s2_1_relu + gap, larger ratio (v4)", ("s2_1_relu", "gap"), train_shifted, selection)
    row("all five layers, larger ratio", LAYERS, train_shifted, selection)


if __name__ == "__main__":
    main()
