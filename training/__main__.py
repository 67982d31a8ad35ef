"""Command line: `python -m training train|evaluate ...` (also `pneumoscan-train`)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "chest_xray"
DEFAULT_STORE = Path(__file__).resolve().parent.parent / "model_store"


def age_range_text(text: str) -> str:
    """--population-age-years, checked before any training starts."""
    from app.population import AgeRange

    try:
        AgeRange.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text.strip()


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model and export a new store version")
    train.add_argument(
        "--data",
        default=str(DEFAULT_DATA),
        help="Kaggle-layout folder; its train/ split is split by patient",
    )
    train.add_argument("--model-store", default=str(DEFAULT_STORE))
    train.add_argument("--model-name", default="pneumonia")
    train.add_argument("--arch", default="sepcnn", choices=["sepcnn", "seed"])
    train.add_argument(
        "--width",
        type=int,
        default=32,
        help="sepcnn's stem filters; every stage scales with it (32 = the shipped models)",
    )
    train.add_argument(
        "--input-pool",
        type=int,
        default=2,
        help="sepcnn averages the 224 px input by this factor before its stem (2 = 112 px, the "
        "shipped models; 3 = 74 px)",
    )
    train.add_argument("--epochs", type=int, default=40)  # the shipped v1 recipe
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--learning-rate", type=float, default=2e-3)
    train.add_argument(
        "--weight-decay",
        type=float,
        default=1e-4,
        help="AdamW's decoupled weight decay (1e-4: v1 and v2)",
    )
    train.add_argument(
        "--patience",
        type=int,
        default=40,
        help="with --swa-epochs 0: stop after this many epochs without a better selection-set "
        "loss; 40 runs the whole cosine schedule and keeps the best epoch (v1 was made with 8); "
        "weight averaging always runs the whole schedule",
    )
    train.add_argument("--seed", type=int, default=42)
    train.add_argument(
        "--max-minutes",
        type=float,
        default=42.0,
        help="wall-clock budget for fitting; the best epoch so far is kept",
    )
    train.add_argument(
        "--strategy",
        default="default",
        choices=["default", "mirrored", "multi-worker"],
        help="tf.distribute strategy (multi-worker reads TF_CONFIG)",
    )
    train.add_argument(
        "--limit", type=int, default=0, help="at most this many images per class (smoke runs)"
    )
    train.add_argument("--no-augment", action="store_true")
    train.add_argument(
        "--augmentation",
        default="basic",
        choices=["basic", "shift", "framing", "erase"],
        help="basic: geometry + exposure (the shipped recipe); shift: also flips, burned-in "
        "markers and collimation bands; framing: basic with zoom-in up to 25%% per axis "
        "instead of 15%%; erase: basic with one random box (10-40%% of each side) erased on "
        "half the images",
    )
    train.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="momentum of a weight moving average that is validated, selected on validation "
        "AUC and exported (e.g. 0.995; 0 = off, select raw weights on validation loss)",
    )
    train.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="pull the training targets towards 0.5 by this much (e.g. 0.1; 0 = off); "
        "temperature scaling recalibrates afterwards",
    )
    train.add_argument(
        "--init-seed",
        type=int,
        default=None,
        help="seed for weight initialisation, shuffling and augmentation (default: --seed); "
        "the patient split and the selection set follow --seed only",
    )
    train.add_argument(
        "--mixup",
        type=float,
        default=0.0,
        metavar="ALPHA",
        help="blend training images, labels and class weights in pairs by Beta(ALPHA, ALPHA) "
        "(e.g. 0.2; 0 = off)",
    )
    train.add_argument(
        "--swa-epochs",
        type=int,
        default=10,
        metavar="N",
        help="stochastic weight averaging: export the mean of the last N epochs' weights with "
        "batch-norm statistics recomputed (runs every epoch; 0 = keep the best epoch, as v1 "
        "was made; --ema needs 0)",
    )
    train.add_argument(
        "--swa-lr",
        type=float,
        default=0.0,
        metavar="LR",
        help="hold this learning rate during the averaged epochs, the cosine decaying to it "
        "before them (e.g. 5e-4; 0 = the averaged epochs follow the cosine tail, as v2 was made)",
    )
    train.add_argument(
        "--consistency",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="train on two augmented views of every image, adding WEIGHT x the Jensen-Shannon "
        "divergence between their predictions to the loss (AugMix uses 12; 0 = off, as v2 was "
        "made); twice the images per step",
    )
    train.add_argument(
        "--teacher",
        type=Path,
        default=None,
        metavar="VERSION_DIR",
        help="distil from this store version (model_store/<name>/<v>), trained on the same "
        "patient split: its calibrated answer on each augmented image is mixed into the target "
        "(off by default, as v2 was made)",
    )
    train.add_argument(
        "--population-age-years",
        default="1-5",
        type=age_range_text,
        metavar="LOW-HIGH",
        help="ages (completed years) of the patients in --data, written to the card as "
        "population.age_years; the service flags DICOMs of patients outside them. The images "
        "carry no ages: 1-5 is how Kermany et al. 2018 describe the shared data's cohort",
    )
    train.add_argument(
        "--distill",
        type=float,
        default=0.5,
        metavar="W",
        help="with --teacher: target = (1 - W) x label + W x the teacher's probability",
    )

    evaluate = sub.add_parser("evaluate", help="score a store version on a labelled folder")
    evaluate.add_argument("--model", required=True, help="model_store/<name>/<version>")
    evaluate.add_argument("--data", required=True, help="Kaggle-layout folder")
    evaluate.add_argument(
        "--split", default="test", help="sub-folder to read if present (default: test)"
    )
    evaluate.add_argument("--plots", help="folder to write ROC/confusion/reliability PNGs")
    evaluate.add_argument(
        "--robustness",
        action="store_true",
        help="also score under the fixed acquisition perturbations",
    )
    evaluate.add_argument(
        "--originals",
        help="Kaggle-layout folder of full-resolution originals (e.g. ../shared/data/originals): "
        "scores those of internal-test patients through the service's decode path",
    )
    evaluate.add_argument(
        "--part",
        choices=["train", "validation", "internal_test"],
        help="score only this part of the version's recorded patient split (read from --data's "
        "train split); 'validation' is what choosing between versions may use",
    )
    promote = sub.add_parser(
        "promote", help="publish a candidate version (e.g. from runs/store) as the next version"
    )
    promote.add_argument("source", help="a version folder, e.g. runs/store/pneumonia/1")
    promote.add_argument("--model-store", default=str(DEFAULT_STORE))
    promote.add_argument("--model-name", default="pneumonia")
    attach = sub.add_parser(
        "attach-ood",
        help="publish a version again as the next one, its signature also returning ood_score",
    )
    attach.add_argument("--source", required=True, help="the version folder to take")
    attach.add_argument("--data", default=str(DEFAULT_DATA), help="the data its split names")
    attach.add_argument("--model-store", default=str(DEFAULT_STORE))
    attach.add_argument("--model-name", default="pneumonia")
    lite = sub.add_parser(
        "attach-tflite",
        help="publish a version again as the next one, unchanged but with model.tflite added "
        "(the service runs it with LiteRT)",
    )
    lite.add_argument("--source", required=True, help="the version folder to take")
    lite.add_argument("--model-store", default=str(DEFAULT_STORE))
    lite.add_argument("--model-name", default="pneumonia")
    ensemble = sub.add_parser(
        "ensemble",
        help="publish the average of two or more versions of one patient split as the next version",
    )
    ensemble.add_argument(
        "members",
        nargs="+",
        help="version folders, e.g. model_store/pneumonia/2 runs/store/pneumonia/4",
    )
    ensemble.add_argument("--data", default=str(DEFAULT_DATA), help="the data their split names")
    ensemble.add_argument("--model-store", default=str(DEFAULT_STORE))
    ensemble.add_argument("--model-name", default="pneumonia")
    card = sub.add_parser("card", help="print a version's model card as Markdown")
    card.add_argument("--model", required=True, help="model_store/<name>/<version>")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command not in ("card", "promote") and importlib.util.find_spec("tensorflow") is None:
        print(
            f"python -m training {args.command} needs TensorFlow, which a serving install "
            "leaves out: pip install -e '.[training]'",
            file=sys.stderr,
        )
        return 2
    if args.command == "card":
        from training.card import main_card

        return main_card(args)
    if args.command == "promote":
        from training.promote import main_promote

        return main_promote(args)
    if args.command == "attach-ood":
        from training.attach_ood import main_attach

        return main_attach(args)
    if args.command == "attach-tflite":
        from training.export import main_attach_tflite

        return main_attach_tflite(args)
    if args.command == "ensemble":
        from training.ensemble import main_ensemble

        return main_ensemble(args)
    if args.command == "evaluate":
        from training.evaluate import main_evaluate

        return main_evaluate(args)

    from training.data import DataError
    from training.train import TrainConfig, train

    config = TrainConfig(
        data=Path(args.data),
        model_store=Path(args.model_store),
        model_name=args.model_name,
        arch=args.arch,
        width=args.width,
        input_pool=args.input_pool,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        patience=args.patience,
        seed=args.seed,
        max_minutes=args.max_minutes,
        strategy=args.strategy,
        limit=args.limit,
        augment=not args.no_augment,
        augmentation=args.augmentation,
        ema=args.ema,
        label_smoothing=args.label_smoothing,
        mixup=args.mixup,
        swa_epochs=args.swa_epochs,
        swa_lr=args.swa_lr,
        consistency=args.consistency,
        teacher=args.teacher,
        distill=args.distill,
        init_seed=args.init_seed,
        population_age_years=args.population_age_years,
    )
    try:
        _version, folder = train(config)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
