"""How steady a LIME explanation is against how many perturbation samples it draws.

    python -m benchmarks.lime_samples [--per-class 8] [--samples 1000 2000 4000]

For each sample count: the Jaccard overlap of the explained pixels between seeds 1 and 2 on
the first `--per-class` NORMAL and PNEUMONIA full-resolution originals (the served model, the
predicted class, the service's default number of regions), and the seconds per explanation
when run one at a time in this process (the service pools the model calls, so it is faster).
This informs the default `num_samples`; it is not a target of its own.
"""

from __future__ import annotations

import argparse

from app.settings import Settings
from benchmarks.common import report
from benchmarks.model import load_served
from benchmarks.service import lime_stability


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--samples", type=int, nargs="+", default=[1000, 2000, 4000])
    args = parser.parse_args()
    model, _ = load_served()
    features = Settings().explain_num_features
    rows, results = [], []
    for samples in args.samples:
        result = {
            "num_samples": samples,
            **lime_stability(model, samples, features, args.per_class),
        }
        results.append(result)
        rows.append(
            (
                f"{samples} samples: Jaccard mean / median / min; s per explanation p50",
                f"{result['mean_jaccard']} / {result['median_jaccard']} / "
                f"{result['min_jaccard']}; {result['seconds_p50']}",
            )
        )
    report(
        "LIME stability against samples",
        rows,
        {"model_version": model.version, "num_features": features, "results": results},
    )


if __name__ == "__main__":
    main()
