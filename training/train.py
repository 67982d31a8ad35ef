"""`python -m training train`: split by patient, train, calibrate on validation, export."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from app.population import AgeRange
from training import architectures, consistency, distillation, ood
from training.augmentation import augment_fn, mixup_fn, shifted_copy
from training.batchnorm import recalibrate_batchnorm
from training.data import CLASS_NAMES, load_arrays, manifest, patient_split, scan
from training.evaluate import robustness_report
from training.export import export_version
from training.metrics import (
    classification_report,
    ece,
    fit_temperature,
    screening_threshold,
    sigmoid,
)

log = logging.getLogger("training")


@dataclass
class TrainConfig:
    data: Path
    model_store: Path
    model_name: str = "pneumonia"
    arch: str = "sepcnn"
    # sepcnn's stem filters; every stage scales with it (32: v1 and v2, 66 MFLOPs per image).
    width: int = architectures.DEFAULT_WIDTH
    input_pool: int = architectures.DEFAULT_INPUT_POOL
    epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    # The whole cosine schedule, best epoch kept. v1 was made with 8, which stopped all five
    # later patience-8 draws at epochs 12-26 on the swinging validation loss; every same-seed
    # whole-schedule draw scored higher (docs/experiments/recipe_draws.txt).
    patience: int = 40
    seed: int = 42  # the patient split, the selection set's shifted copy, the perturbations
    # Weight initialisation, shuffling and augmentation; None = `seed`. Another value re-runs
    # the same recipe on the same split, which measures run-to-run variation.
    init_seed: int | None = None
    max_minutes: float = 42.0
    min_sensitivity: float = 0.97
    strategy: str = "default"
    limit: int = 0  # use at most this many images per class (tests and smoke runs)
    augment: bool = True
    # The shipped v1 recipe. "shift" augmentation and weight averaging (ema=0.995) were tried
    # as candidates and lost on the validation robustness rule (docs/training-history.md).
    augmentation: str = "basic"
    ema: float = 0.0
    # Targets pulled towards 0.5 by this much (0 = off). Temperature scaling afterwards undoes
    # the deliberate under-confidence, so the card's probabilities stay calibrated.
    label_smoothing: float = 0.0
    # Mixup's Beta(alpha, alpha) (0 = off): images, labels and class weights blended in pairs.
    mixup: float = 0.0
    # Stochastic weight averaging (0 = off): export the mean of the last N epochs' weights, with
    # batch-norm statistics recomputed over the train part, instead of the best single epoch.
    # Three draws beat the best-epoch draw of the same init seed (docs/experiments/
    # recipe_draws.txt); the shipped v2 was made this way.
    swa_epochs: int = 10
    # The learning rate the averaged epochs train at (0 = off: they sit in the cosine schedule's
    # tail, falling from ~3e-4 to 4e-5, as v2 was made). With a value, the cosine decays to it
    # over the epochs before the last `swa_epochs` and holds it during them, as Izmailov et al.
    # 2018 run SWA: snapshots further apart, an average closer to an ensemble's.
    swa_lr: float = 0.0
    # Consistency training (0 = off): two augmented views per image and this weight on the
    # Jensen-Shannon divergence between their predictions (AugMix's 12), next to the
    # cross-entropy of each view (training/consistency.py). Twice the images per step.
    consistency: float = 0.0
    # Distillation (None = off): a published store version of the same split whose calibrated
    # answer on each augmented image is mixed into the target with weight `distill`
    # (training/distillation.py).
    teacher: Path | None = None
    distill: float = 0.5
    # The ages (completed years, LOW-HIGH) of the patients in `data`, for the card's
    # population section; the service checks each DICOM's patient age against them.
    population_age_years: str = "1-5"


def population(age_years: str) -> dict:
    """The card's population section: whom the training radiographs came from."""
    return {
        "age_years": AgeRange.parse(age_years).as_list(),
        "source": "--population-age-years: the images carry no ages. The default, 1-5, is how "
        "Kermany et al. 2018 describe the shared data's cohort: pediatric anterior-posterior "
        "chest radiographs from one hospital (Guangzhou Women and Children's Medical Center).",
    }


class TimeBudget(keras.callbacks.Callback):
    """Stop before the wall-clock budget runs out (the best weights are still restored)."""

    def __init__(self, minutes: float) -> None:
        super().__init__()
        self.deadline = time.monotonic() + minutes * 60
        self.epoch_seconds = 0.0
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._start = time.monotonic()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        self.epoch_seconds = max(self.epoch_seconds, time.monotonic() - self._start)
        if time.monotonic() + self.epoch_seconds > self.deadline:
            log.info("time budget reached after epoch %d: stopping", epoch + 1)
            self.model.stop_training = True


class RestoreBest(keras.callbacks.Callback):
    """Keep the weights of the epoch with the best monitored value, whatever stops training."""

    def __init__(self, monitor: str = "val_loss", mode: str = "min") -> None:
        super().__init__()
        self.monitor = monitor
        self.sign = 1.0 if mode == "min" else -1.0
        self.best = np.inf
        self.best_epoch = -1
        self.weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is not None and self.sign * value < self.best:
            value = self.sign * value
            self.best, self.best_epoch = value, epoch
            self.weights = self.model.get_weights()

    def on_train_end(self, logs=None) -> None:
        if self.weights is not None:
            self.model.set_weights(self.weights)


class AverageLastEpochs(keras.callbacks.Callback):
    """Keep the trainable weights of the last `count` epochs; `average()` is their mean."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.snapshots: deque[list[np.ndarray]] = deque(maxlen=count)

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        self.snapshots.append([w.numpy().copy() for w in self.model.trainable_weights])

    def average(self) -> list[np.ndarray]:
        if not self.snapshots:
            raise RuntimeError("no epoch finished, so there are no weights to average")
        return [np.mean(group, axis=0) for group in zip(*self.snapshots, strict=True)]


def make_strategy(name: str) -> tf.distribute.Strategy:
    """TensorFlow's own scale-out: one device, all local GPUs, or workers from TF_CONFIG."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        if "TF_CONFIG" not in os.environ:
            raise SystemExit("--strategy multi-worker needs TF_CONFIG (cluster and task) set")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise SystemExit(f"unknown --strategy {name!r}: default, mirrored or multi-worker")


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],  # noqa: S607
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(ood_section: dict | None) -> dict:
    """The tail every model card ends with: the library versions and commit that made it, and
    the out-of-distribution score's section when the version has one."""
    tail = {
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "git_commit": git_commit(),
    }
    if ood_section is not None:
        tail["ood"] = ood_section
    return tail


def predict_logits(model: keras.Model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return model.predict(images.astype(np.float32), batch_size=batch_size, verbose=0)[:, 0]


def _limit(samples, limit: int):
    if not limit:
        return samples
    out = []
    for label in range(len(CLASS_NAMES)):
        out.extend([s for s in samples if s.label == label][:limit])
    return out


SEED_RECIPE = {
    "batch_size": 32,
    "patience": 5,
    "augment": False,
    "ema": 0.0,
    "label_smoothing": 0.0,
    "mixup": 0.0,
    "swa_epochs": 0,
    "swa_lr": 0.0,
    "consistency": 0.0,
    "teacher": None,
}


def effective_config(config: TrainConfig) -> TrainConfig:
    """The notebook's recipe for `--arch seed`, whatever else was asked: batch 32, early
    stopping patience 5, no augmentation or mixup, no weight averaging of either kind, hard
    labels (RMSprop with its default LR is chosen in `train`)."""
    return replace(config, **SEED_RECIPE) if config.arch == "seed" else config


def learning_rate_schedule(
    config: TrainConfig, steps_per_epoch: int
) -> keras.optimizers.schedules.LearningRateSchedule:
    """Cosine decay over the whole run to 2 % of the peak; with `swa_lr`, cosine decay to
    `swa_lr` over the epochs before the averaged ones, then constant (CosineDecay holds its
    floor once its decay steps are spent)."""
    decay_epochs = config.epochs - config.swa_epochs if config.swa_lr else config.epochs
    return keras.optimizers.schedules.CosineDecay(
        config.learning_rate,
        decay_steps=steps_per_epoch * max(1, decay_epochs),
        alpha=config.swa_lr / config.learning_rate if config.swa_lr else 0.02,
    )


def calibrate_and_score(
    model: keras.Model,
    selection: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray],
    internal_test: tuple[np.ndarray, np.ndarray],
    min_sensitivity: float,
    seed: int,
) -> tuple[float, float, dict, np.ndarray]:
    """Temperature and screening threshold fitted on the selection set, then the card's metrics
    (validation, selection set, internal test at the threshold and at 0.5, ECE before
    calibration, robustness reports). `model` returns one logit. Returns (temperature,
    threshold, metrics, internal-test P(pneumonia))."""
    (x_sel, y_sel), (x_val, y_val), (x_test, y_test) = selection, validation, internal_test
    log.info("calibrating")
    sel_logits = predict_logits(model, x_sel)
    temperature = fit_temperature(y_sel, sel_logits)
    p_sel = sigmoid(sel_logits / temperature)
    threshold = screening_threshold(y_sel, p_sel, min_sensitivity)
    val_logits = predict_logits(model, x_val)
    test_logits = predict_logits(model, x_test)
    p_test = sigmoid(test_logits / temperature)

    metrics = {
        "validation": classification_report(y_val, sigmoid(val_logits / temperature), threshold),
        "selection_set": classification_report(y_sel, p_sel, threshold),
        "internal_test": classification_report(y_test, p_test, threshold),
        "internal_test_at_0.5": classification_report(y_test, p_test, 0.5),
        "ece_before_calibration": {
            "selection_set": round(ece(y_sel, sigmoid(sel_logits)), 4),
            "internal_test": round(ece(y_test, sigmoid(test_logits)), 4),
        },
    }

    def keras_predict(images: np.ndarray) -> np.ndarray:
        return sigmoid(predict_logits(model, images) / temperature)

    log.info("robustness report on the validation split (for choosing between versions)")
    metrics["robustness_validation"] = robustness_report(
        keras_predict, x_val, y_val, threshold, seed=seed
    )
    log.info("robustness report on the internal test split")
    metrics["robustness_internal_test"] = robustness_report(
        keras_predict, x_test, y_test, threshold, seed=seed
    )
    log.info(
        "internal test: %s",
        {k: metrics["internal_test"][k] for k in ("auc", "accuracy", "sensitivity", "specificity")},
    )
    return temperature, threshold, metrics, p_test


def fit_ood(
    model: keras.Model,
    x_train: np.ndarray,
    x_val: np.ndarray,
    x_test: np.ndarray,
    seed: int,
) -> tuple[ood.FeatureStats | None, dict | None]:
    """The out-of-distribution score's statistics (train part + a shifted copy) and threshold
    (selection set), with its flag rates for the card (training.ood.fit_and_report); (None,
    None) for an architecture without pooled features."""
    extractor = ood.feature_model(model)
    if extractor is None:
        return None, None
    log.info("fitting the out-of-distribution score")
    stats, section = ood.fit_and_report(extractor, x_train, x_val, x_test, seed)
    log.info(
        "out-of-distribution threshold %.3f, flag rates %s", stats.threshold, section["flag_rates"]
    )
    return stats, section


def train(config: TrainConfig) -> tuple[int, Path]:
    started = time.monotonic()
    config = effective_config(config)
    if config.swa_epochs > 0 and config.ema > 0:
        raise SystemExit("--swa-epochs and --ema are two kinds of weight averaging: choose one")
    if config.arch == "seed" and (
        config.width != architectures.DEFAULT_WIDTH
        or config.input_pool != architectures.DEFAULT_INPUT_POOL
    ):
        raise SystemExit("--width and --input-pool shape sepcnn; the seed architecture is fixed")
    if not 1 <= config.input_pool <= 4:
        raise SystemExit("--input-pool must be 1 (224 px) to 4 (56 px)")
    if config.swa_lr and not (config.swa_epochs > 0 and 0 < config.swa_lr < config.learning_rate):
        raise SystemExit("--swa-lr needs --swa-epochs > 0 and a value below --learning-rate")
    paired = config.consistency > 0
    if paired and (config.mixup > 0 or config.label_smoothing > 0 or not config.augment):
        raise SystemExit("--consistency needs augmentation and no --mixup or label smoothing")
    if paired and config.strategy != "default":
        raise SystemExit("--consistency pairs views within a batch: use the default strategy")
    if config.teacher is not None and (paired or config.mixup > 0):
        raise SystemExit("--teacher sets the targets itself: not with --consistency or --mixup")
    if config.teacher is not None and not 0 < config.distill <= 1:
        raise SystemExit("--distill is the teacher's share of the target, in (0, 1]")
    run_seed = config.seed if config.init_seed is None else config.init_seed
    keras.utils.set_random_seed(run_seed)
    samples = _limit(scan(config.data, "train"), config.limit)
    parts = patient_split(samples, seed=config.seed)
    data_manifest = manifest(parts)
    log.info("patient-level split: %s", data_manifest["counts"])
    teacher_record: dict | None = None
    if config.teacher is not None:
        teacher, teacher_record = distillation.load_teacher(config.teacher, data_manifest["sha256"])
        log.info("distilling from %s (weight %.2f)", config.teacher, config.distill)
    log.info("decoding %d images through the service's preprocessing", len(samples))
    x_train, y_train = load_arrays(parts["train"])
    x_val, y_val = load_arrays(parts["validation"])
    x_test, y_test = load_arrays(parts["internal_test"])

    # Model selection, temperature and threshold use validation plus a seeded shifted copy of
    # it: the acquisition shift a new hospital brings is what the choices must survive.
    shift_like = config.arch != "seed"
    if shift_like:
        x_sel = np.concatenate([x_val, shifted_copy(x_val, seed=config.seed)])
        y_sel = np.concatenate([y_val, y_val])
    else:
        x_sel, y_sel = x_val, y_val

    counts = np.bincount(y_train, minlength=2)
    class_weight = {i: float(len(y_train) / (2 * max(c, 1))) for i, c in enumerate(counts)}

    strategy = make_strategy(config.strategy)
    steps = max(1, int(np.ceil(len(x_train) / config.batch_size)))
    with strategy.scope():
        model = architectures.build(config.arch, width=config.width, input_pool=config.input_pool)
        if config.arch == "seed":
            optimizer = keras.optimizers.RMSprop()
        else:
            optimizer = keras.optimizers.AdamW(
                learning_rate_schedule(config, steps),
                weight_decay=config.weight_decay,
                use_ema=config.ema > 0,
                ema_momentum=config.ema or 0.99,
            )
        if paired:
            loss: keras.losses.Loss = consistency.PairedConsistencyLoss(config.consistency)
        else:
            loss = keras.losses.BinaryCrossentropy(
                from_logits=True, label_smoothing=config.label_smoothing
            )
        model.compile(
            optimizer=optimizer,
            loss=loss,
            metrics=[
                distillation.HardTargetAUC(name="auc", from_logits=True)
                if config.teacher is not None
                else keras.metrics.AUC(name="auc", from_logits=True)
            ],
        )
    log.info(
        "%s: %d parameters, %.1f MFLOPs per image",
        config.arch,
        model.count_params(),
        architectures.flops_per_image(model) / 1e6,
    )

    train_ds = tf.data.Dataset.from_tensor_slices((x_train, y_train.astype(np.float32)))
    train_ds = train_ds.shuffle(len(x_train), seed=run_seed, reshuffle_each_iteration=True)
    train_ds = train_ds.batch(config.batch_size)
    if config.augment and config.arch != "seed":
        prepare = augment_fn(run_seed, config.augmentation)
    else:

        def prepare(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            return tf.cast(x, tf.float32), y

    if paired:
        train_ds = train_ds.map(
            consistency.paired_views(prepare), num_parallel_calls=tf.data.AUTOTUNE
        )
    else:
        train_ds = train_ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    fit_class_weight: dict[int, float] | None = class_weight
    if config.mixup > 0:
        # The class weights travel with the mixed pairs as per-sample weights.
        train_ds = train_ds.map(mixup_fn(config.mixup, class_weight))
        fit_class_weight = None
    if config.teacher is not None:
        # Soft targets; the class weights travel as per-sample weights of the hard label.
        train_ds = train_ds.map(
            distillation.distilled_targets(teacher, config.distill, class_weight)
        )
        fit_class_weight = None
    train_ds = train_ds.prefetch(tf.data.AUTOTUNE)
    val_ds = tf.data.Dataset.from_tensor_slices(
        (x_sel.astype(np.float32), y_sel.astype(np.float32))
    ).batch(64)
    if paired:  # the paired loss sees each validation image twice: plain cross-entropy
        val_ds = val_ds.map(consistency.duplicated)

    # Select on ranking (AUC) when the averaged weights are validated: their validation AUC
    # rises smoothly while the class-weighted, not yet calibrated loss climbs with confidence
    # (the first EMA run stopped at epoch 16 on loss while AUC was still improving). Temperature
    # and threshold are fitted afterwards, on the same selection set.
    use_ema = config.ema > 0 and config.arch != "seed"
    monitor, mode = ("val_auc", "max") if use_ema else ("val_loss", "min")
    restore = RestoreBest(monitor, mode)
    callbacks: list[keras.callbacks.Callback] = []
    if use_ema:
        # Validate, select and keep the averaged weights: epoch-to-epoch validation loss of the
        # raw weights swung by 10x in the v1 run, which made "best epoch" partly luck.
        callbacks.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    callbacks += [restore, TimeBudget(config.max_minutes)]
    swa = AverageLastEpochs(config.swa_epochs) if config.swa_epochs > 0 else None
    if swa is not None:
        # The average needs the schedule's low-learning-rate tail, so nothing stops it early.
        callbacks.append(swa)
    else:
        stop = keras.callbacks.EarlyStopping(monitor, patience=config.patience, mode=mode)
        callbacks.append(stop)
    log.info(
        "training %s for up to %d epochs / %.0f min", config.arch, config.epochs, config.max_minutes
    )
    fit_started = time.monotonic()
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=config.epochs,
        class_weight=fit_class_weight,
        callbacks=callbacks,
        verbose=2,
    )
    fit_seconds = time.monotonic() - fit_started
    log.info(
        "best epoch %d (%s %.4f)", restore.best_epoch + 1, monitor, restore.sign * restore.best
    )
    selection = f"{monitor} ({mode}) on the selection set"
    if swa is not None:
        for weight, value in zip(model.trainable_weights, swa.average(), strict=True):
            weight.assign(value)
        stats_ds = tf.data.Dataset.from_tensor_slices((x_train, y_train.astype(np.float32)))
        stats_ds = stats_ds.shuffle(len(x_train), seed=run_seed).batch(64).map(prepare)
        batches = recalibrate_batchnorm(model, (images for images, _ in stats_ds))
        selection = (
            f"mean weights of the last {len(swa.snapshots)} epochs, batch-norm statistics "
            f"recomputed over {batches} training batches"
        )
        log.info("exporting the %s", selection)
    temperature, threshold, metrics, p_test = calibrate_and_score(
        model, (x_sel, y_sel), (x_val, y_val), (x_test, y_test), config.min_sensitivity, config.seed
    )

    feature_stats, ood_section = fit_ood(model, x_train, x_val, x_test, seed=config.seed)

    card = {
        "name": config.model_name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "intended_use": "Screening assistance only: a clinician reads every image. "
        "Not a diagnosis and not a medical device.",
        "architecture": config.arch,
        "parameters": int(model.count_params()),
        "flops_per_image": architectures.flops_per_image(model),
        "class_names": list(CLASS_NAMES),
        "threshold": round(float(threshold), 6),
        "threshold_rule": f"highest threshold with pneumonia sensitivity >= "
        f"{config.min_sensitivity} on "
        + (
            "the selection set (validation + seeded shifted copy)"
            if shift_like
            else "the validation split"
        ),
        "temperature": round(float(temperature), 6),
        "metrics": metrics,
        "training": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
            "class_weight": class_weight,
            "teacher": teacher_record,
            "epochs_run": len(history.history["loss"]),
            "best_epoch": restore.best_epoch + 1,
            "selection_monitor": selection,
            "fit_seconds": round(fit_seconds, 1),
            "total_seconds": round(time.monotonic() - started, 1),
            "history": {
                k: [round(float(v), 5) for v in vals] for k, vals in history.history.items()
            },
            "host": f"{platform.machine()} {os.cpu_count()} CPUs",
        },
        "data": {
            "source": "Kermany/Mooney Chest X-Ray Images (Pneumonia), doi:10.17632/rscbjbr9sj.2, "
            "CC BY 4.0",
            "manifest_sha256": data_manifest["sha256"],
            "counts": data_manifest["counts"],
            "split": "seeded, patient-level, stratified 80/10/10 of the official train split",
        },
        "population": population(config.population_age_years),
        **provenance(ood_section),
    }
    plots = {
        "history": history.history,
        "labels": y_test,
        "p_pneumonia": p_test,
        "threshold": threshold,
        "title": "(internal test)",
    }
    version, folder = export_version(
        config.model_store / config.model_name,
        model,
        temperature,
        card,
        plots,
        extra_files={"split.json": json.dumps(data_manifest["files"], indent=0) + "\n"},
        ood=feature_stats,
    )
    log.info("exported %s version %d to %s", config.model_name, version, folder)
    return version, folder
