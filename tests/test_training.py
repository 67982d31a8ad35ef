"""Training package: patient split, a tiny end-to-end run, evaluate, and clear data errors."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from app.imaging import load_path
from tests.conftest import FIXTURES
from training.__main__ import main
from training.data import DataError, manifest, patient_id, patient_split, scan
from training.metrics import (
    fit_temperature,
    logit,
    roc_auc,
    screening_threshold,
    selection_score,
    sigmoid,
)


def test_patient_ids_follow_the_data_set_naming() -> None:
    assert patient_id("IM-0115-0001.jpeg") == "IM-0115"
    assert patient_id("IM-0429-0001-0002.jpeg") == "IM-0429"
    assert patient_id("NORMAL2-IM-0372-0001.jpeg") == "NORMAL2-IM-0372"
    assert patient_id("person1_bacteria_1.jpeg") == patient_id("person1_virus_6.jpeg") == "person1"


def test_split_is_by_patient_seeded_and_stratified(tmp_path: Path) -> None:
    for label in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "train" / label).mkdir(parents=True)
    for i in range(40):
        for j in range(3):
            (tmp_path / "train" / "PNEUMONIA" / f"person{i}_bacteria_{j}.jpeg").touch()
        (tmp_path / "train" / "NORMAL" / f"IM-{i:04d}-0001.jpeg").touch()
    samples = scan(tmp_path, "train")
    parts = patient_split(samples, seed=1)
    patients = {name: {s.patient for s in part} for name, part in parts.items()}
    assert not patients["train"] & patients["validation"]
    assert not patients["train"] & patients["internal_test"]
    assert not patients["validation"] & patients["internal_test"]
    assert {s.label for s in parts["validation"]} == {0, 1}
    again = patient_split(samples, seed=1)
    assert [s.path for s in again["internal_test"]] == [s.path for s in parts["internal_test"]]


def test_calibration_helpers() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    logits = 3.0 * ((labels * 2 - 1) * 1.5 + rng.normal(0, 1, 2000))  # calibrated log-odds
    temperature = fit_temperature(labels, logits * 3)  # overconfident by 3x
    assert 2.4 < temperature < 3.6
    p = sigmoid(logits)
    threshold = screening_threshold(labels, p, 0.97)
    assert (p[labels == 1] >= threshold).mean() >= 0.97
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    np.testing.assert_allclose(logit(sigmoid(np.array([-8.0, -0.5, 0.0, 3.0]))), [-8, -0.5, 0, 3])
    assert np.isfinite(logit(np.array([0.0, 1.0]))).all()  # clipped, not infinite


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Kaggle layout with the 20 fixture radiographs as its train split."""
    root = tmp_path_factory.mktemp("data")
    for label in ("NORMAL", "PNEUMONIA"):
        target = root / "train" / label
        target.mkdir(parents=True)
        for source in (FIXTURES / "val" / label, FIXTURES / "chest_xray" / label):
            for path in source.iterdir():
                shutil.copy(path, target / path.name)
    return root


def tiny_run(data: Path, store: Path, *extra: str) -> list[str]:
    """Arguments for a one-epoch training run on the fixture radiographs."""
    return [
        "train",
        "--data",
        str(data),
        "--model-store",
        str(store),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        *extra,
    ]


def test_tiny_end_to_end_train_export_reload(small_data: Path, tmp_path: Path, capsys) -> None:
    import tensorflow as tf

    store = tmp_path / "store"
    # The candidate options (weight averaging, shift augmentation, label smoothing) in the
    # first run; the shipped recipe's defaults in the second.
    code = main(
        tiny_run(
            small_data,
            store,
            "--max-minutes",
            "2",
            "--ema",
            "0.99",
            "--augmentation",
            "shift",
            "--label-smoothing",
            "0.1",
            "--mixup",
            "0.2",
            "--init-seed",
            "7",
            "--swa-epochs",
            "0",
            "--population-age-years",
            "0-17",
        )
    )
    assert code == 0
    folder = store / "pneumonia" / "1"
    card = json.loads((folder / "model.json").read_text())
    for key in (
        "threshold",
        "temperature",
        "parameters",
        "flops_per_image",
        "metrics",
        "training",
        "data",
        "tensorflow_version",
        "git_commit",
        "created",
    ):
        assert key in card
    assert card["data"]["manifest_sha256"] and card["version"] == 1
    assert card["training"]["label_smoothing"] == 0.1 and card["training"]["mixup"] == 0.2
    assert card["training"]["init_seed"] == 7 and card["training"]["seed"] == 42
    assert card["population"]["age_years"] == [0, 17]  # what the service checks ages against
    # The patient split follows --seed alone, whatever --init-seed says.
    split = manifest(patient_split(scan(small_data, "train"), seed=42))
    assert card["data"]["manifest_sha256"] == split["sha256"]
    for plot in ("training_curves.png", "roc.png", "confusion_matrix.png", "reliability.png"):
        assert (folder / plot).stat().st_size > 1000
    listed = (folder / "checksums.sha256").read_text()
    assert "saved_model.pb" in listed and "model.json" in listed

    loaded = tf.saved_model.load(str(folder))
    pixels = np.zeros((3, 224, 224, 1), np.uint8)
    probs = loaded.signatures["serving_default"](pixels=tf.constant(pixels))["probabilities"]
    assert probs.shape == (3, 2)
    assert np.allclose(probs.numpy().sum(axis=1), 1.0, atol=1e-5)

    # A second run is version 2: never an overwrite.
    assert main(tiny_run(small_data, store, "--limit", "4")) == 0
    second = json.loads((store / "pneumonia" / "2" / "model.json").read_text())["training"]
    assert second["augmentation"] == "basic" and second["ema"] == 0.0
    assert second["label_smoothing"] == 0.0 and second["mixup"] == 0.0
    assert second["init_seed"] is None
    assert second["swa_epochs"] == 10  # the default recipe averages the last epochs' weights
    population = json.loads((store / "pneumonia" / "2" / "model.json").read_text())["population"]
    assert population["age_years"] == [1, 5]  # the shared data's cohort
    assert second["selection_monitor"].startswith("mean weights of the last 1 epochs")
    assert sorted(p.name for p in (store / "pneumonia").iterdir()) == ["1", "2"]

    # The signature also scores how unlike the training images an input is (training.ood).
    second_card = json.loads((store / "pneumonia" / "2" / "model.json").read_text())
    assert second_card["ood"]["threshold"] > 0
    assert {"validation", "internal_test", "synthetic_mistakes"} <= set(
        second_card["ood"]["flag_rates"]
    )
    serve = tf.saved_model.load(str(store / "pneumonia" / "2")).signatures["serving_default"]
    radiographs = np.stack([load_path(str(p)) for p in sorted(small_data.rglob("*.jpeg"))[:4]])
    out = serve(pixels=tf.constant(radiographs[..., None]))
    assert out["ood_score"].shape == (4,) and np.isfinite(out["ood_score"].numpy()).all()

    # attach-ood publishes a version again with the same probabilities and a refitted score.
    assert (
        main(
            [
                "attach-ood",
                "--source",
                str(store / "pneumonia" / "2"),
                "--data",
                str(small_data),
                "--model-store",
                str(store),
            ]
        )
        == 0
    )
    third = store / "pneumonia" / "3"
    derived = json.loads((third / "model.json").read_text())
    assert derived["derived_from"]["version"] == 2 and derived["ood"]["threshold"] > 0
    assert derived["threshold"] == second_card["threshold"]
    assert (third / "split.json").read_bytes() == (
        store / "pneumonia" / "2" / "split.json"
    ).read_bytes()
    again = tf.saved_model.load(str(third)).signatures["serving_default"]
    np.testing.assert_allclose(
        again(pixels=tf.constant(radiographs[..., None]))["probabilities"].numpy(),
        out["probabilities"].numpy(),
        atol=1e-5,
    )
    shutil.rmtree(third)

    capsys.readouterr()
    assert main(["card", "--model", str(folder)]) == 0
    card_text = capsys.readouterr().out
    assert "pneumonia v1" in card_text and "| auc |" in card_text
    assert "Out-of-distribution flag: `ood_score` above" in card_text
    assert "Population: patients aged 0-17 (completed years);" in card_text  # its own ages
    assert main(["evaluate", "--model", str(folder), "--data", str(FIXTURES / "val")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 16
    assert sum(map(sum, result["confusion_matrix"]["matrix"])) == 16
    for key in ("accuracy", "auc", "sensitivity", "specificity", "precision", "f1", "ece"):
        assert key in result

    # Scoring one part of the version's recorded patient split (what choosing versions uses).
    validation = json.loads((folder / "split.json").read_text())["validation"]
    args = ["evaluate", "--model", str(folder), "--data", str(small_data), "--split", "train"]
    assert main([*args, "--part", "validation", "--robustness"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["part"] == "validation" and result["n"] == len(validation)
    assert {"clean", "gamma_0.6", "worst"} <= set(result["robustness"])
    assert "robustness_validation" in card["metrics"]
    assert card["training"]["selection_monitor"].startswith("val_auc")

    # Promoting a candidate into a serving store: next number, same files, verifiable.
    serving = tmp_path / "serving" / "pneumonia"
    (serving / "7").mkdir(parents=True)  # an existing (even broken) version is never touched
    assert main(["promote", str(folder), "--model-store", str(serving.parent)]) == 0
    promoted = serving / "8"
    from app.model_store import verify_version

    promoted_card = verify_version(promoted)
    assert promoted_card["version"] == 8 and promoted_card["promoted_from"]["version"] == 1
    assert promoted_card["threshold"] == card["threshold"]
    assert (promoted / "saved_model.pb").read_bytes() == (folder / "saved_model.pb").read_bytes()
    assert not list((serving / "7").iterdir())
    (folder / "model.json").write_text("{}")
    with pytest.raises(SystemExit, match="checksum mismatch"):
        main(["promote", str(folder), "--model-store", str(serving.parent)])


def test_missing_class_folder_is_a_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "train" / "NORMAL").mkdir(parents=True)
    assert main(["train", "--data", str(tmp_path), "--model-store", str(tmp_path / "s")]) == 2
    assert "missing: PNEUMONIA" in capsys.readouterr().err


def test_unreadable_image_is_a_clear_error(small_data: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(small_data, broken)
    (broken / "train" / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    assert (
        main(
            ["train", "--data", str(broken), "--model-store", str(tmp_path / "s"), "--epochs", "1"]
        )
        == 2
    )
    assert "IM-9999-0001.jpeg" in capsys.readouterr().err


def test_nonexistent_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        scan(tmp_path / "nope")


def test_distribution_strategies(monkeypatch) -> None:
    import tensorflow as tf

    from training.train import make_strategy

    assert isinstance(make_strategy("mirrored"), tf.distribute.MirroredStrategy)
    assert make_strategy("default") is tf.distribute.get_strategy()
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(SystemExit, match="TF_CONFIG"):
        make_strategy("multi-worker")


def test_shift_augmentation_adds_markers_and_bands_within_range() -> None:
    import tensorflow as tf

    from training.augmentation import acquisition_artifacts, augment_fn

    tf.random.set_seed(3)
    images = tf.fill([64, 224, 224, 1], 60.0)
    marked = acquisition_artifacts(images).numpy()
    changed = marked != 60.0
    # Only brightening boxes are burned in, on a good share of the images, never all pixels.
    assert marked.min() >= 60.0 and marked.max() <= 255.0
    assert 8 < changed.any(axis=(1, 2, 3)).sum() < 64
    assert changed.mean() < 0.2
    labels = tf.zeros([64])
    for level in ("basic", "shift", "framing", "erase"):
        out, same = augment_fn(0, level)(tf.cast(images, tf.uint8), labels)
        assert out.shape == (64, 224, 224, 1) and same is labels
        assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 255.0
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment_fn(0, "wild")


def test_random_erase_sets_one_box_per_erased_image_to_one_grey() -> None:
    import tensorflow as tf

    from training.augmentation import random_erase

    tf.random.set_seed(5)
    images = tf.reshape(tf.range(224 * 224, dtype=tf.float32) % 251.0 + 0.5, [1, 224, 224, 1])
    images = tf.tile(images, [64, 1, 1, 1])  # no pixel of the original is a whole grey level
    erased = random_erase(images).numpy()
    changed = erased != images.numpy()
    hit = changed.any(axis=(1, 2, 3))
    assert 16 < hit.sum() < 48  # about half the images
    for index in np.flatnonzero(hit):
        rows = np.flatnonzero(changed[index].any(axis=(1, 2)))
        cols = np.flatnonzero(changed[index].any(axis=(0, 2)))
        box = erased[index, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        assert changed[index].sum() == box.size  # one solid rectangle
        assert np.unique(box).size == 1 and 0.0 <= box.flat[0] <= 255.0
        assert 0.09 * 224 <= rows.size <= 0.41 * 224 and 0.09 * 224 <= cols.size <= 0.41 * 224


def test_framing_augmentation_zooms_in_further_than_basic() -> None:
    """A bright centre square grows under zoom-in; 'framing' allows up to 25 % per axis."""
    import tensorflow as tf

    from training.augmentation import BASIC_ZOOM_IN, FRAMING_ZOOM_IN, geometric_layers

    zooms = [geometric_layers(0, z).layers[2] for z in (BASIC_ZOOM_IN, FRAMING_ZOOM_IN)]
    assert [z.height_factor[0] for z in zooms] == [-0.15, -0.25]
    assert all(z.height_factor[1] == z.width_factor[1] == 0.12 for z in zooms)
    square = tf.pad(tf.fill([1, 100, 100, 1], 200.0), [[0, 0], [62, 62], [62, 62], [0, 0]])
    only_zoom = type(zooms[1])((-0.25, -0.25), (-0.25, -0.25), fill_mode="constant")
    grown = float(tf.reduce_mean(tf.cast(only_zoom(square, training=True) > 100, tf.float32)))
    assert grown > (100 * 100) / (224 * 224) * 1.5  # magnified by 1/0.75 per axis


def test_restore_best_keeps_the_best_epoch_in_either_direction() -> None:
    import keras

    from training.train import RestoreBest

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    for mode, values, best in (("max", [0.9, 0.95, 0.93], 1), ("min", [0.3, 0.2, 0.25], 1)):
        restore = RestoreBest("val_auc", mode)
        restore.set_model(model)
        for epoch, value in enumerate(values):
            model.layers[0].kernel.assign([[float(epoch)]])
            restore.on_epoch_end(epoch, {"val_auc": value})
        restore.on_train_end()
        assert restore.best_epoch == best
        assert float(model.layers[0].kernel.numpy()[0, 0]) == float(best)


def test_evaluate_part_needs_a_recorded_split(tmp_path: Path) -> None:
    from training.evaluate import split_part

    with pytest.raises(DataError, match=r"no split\.json"):
        split_part([], tmp_path, "validation")
    (tmp_path / "split.json").write_text(json.dumps({"validation": ["NORMAL/x.jpeg"]}))
    with pytest.raises(DataError, match="must be one of"):
        split_part([], tmp_path, "elsewhere")
    with pytest.raises(DataError, match="none of the validation files"):
        split_part(scan(FIXTURES / "val", None), tmp_path, "validation")


def test_train_command_defaults_are_the_documented_recipe() -> None:
    """`pneumoscan train` with no options runs TrainConfig's recipe (the one the README and the
    model card describe), not a second set of defaults kept in the argument parser."""
    from dataclasses import MISSING, fields

    from training.__main__ import parser
    from training.train import TrainConfig

    args = vars(parser().parse_args(["train"]))
    shared = [f for f in fields(TrainConfig) if f.name in args and f.default is not MISSING]
    assert len(shared) >= 14
    for field in shared:
        assert args[field.name] == field.default, field.name
    assert not args["no_augment"] and TrainConfig.augment
    assert TrainConfig.patience >= TrainConfig.epochs  # the whole schedule, best epoch kept


@pytest.mark.parametrize("ages", ["5-1", "adults", "1-500"])
def test_a_bad_population_age_range_stops_before_training(ages: str, capsys) -> None:
    from training.__main__ import parser

    with pytest.raises(SystemExit) as stopped:
        parser().parse_args(["train", "--population-age-years", ages])
    assert stopped.value.code == 2
    assert "--population-age-years" in capsys.readouterr().err


def test_selection_score_is_mean_balanced_accuracy_then_auc_and_worst_specificity() -> None:
    reports = [
        {"sensitivity": 1.0, "specificity": 0.9, "auc": 0.99},
        {"sensitivity": 0.9, "specificity": 0.7, "auc": 0.97},
    ]
    balanced, auc, worst = selection_score(reports)
    assert balanced == pytest.approx((0.95 + 0.8) / 2)
    assert auc == pytest.approx(0.98) and worst == 0.7
    with pytest.raises(ValueError, match="at least one"):
        selection_score([])


def test_seed_architecture_keeps_the_notebook_recipe(tmp_path: Path) -> None:
    from training.train import TrainConfig, effective_config

    asked = TrainConfig(
        tmp_path,
        tmp_path,
        arch="seed",
        batch_size=64,
        augment=True,
        ema=0.99,
        label_smoothing=0.1,
        mixup=0.2,
    )
    seed = effective_config(asked)
    assert (seed.batch_size, seed.patience, seed.augment) == (32, 5, False)
    assert seed.ema == 0.0 and seed.label_smoothing == 0.0 and seed.mixup == 0.0
    ours = effective_config(TrainConfig(tmp_path, tmp_path, label_smoothing=0.1))
    assert ours.label_smoothing == 0.1 and ours.arch == "sepcnn"


def test_width_scales_every_sepcnn_stage_and_not_the_seed(tmp_path: Path) -> None:
    from training import architectures
    from training.train import TrainConfig, train

    default = architectures.build("sepcnn")
    wider = architectures.build("sepcnn", width=40)
    assert architectures.build_sepcnn().count_params() == default.count_params()
    assert wider.get_layer("stem").filters == 40 and default.get_layer("stem").filters == 32
    assert wider.get_layer("s3_1_sep").filters == 7 * 40
    assert 1.4 < architectures.flops_per_image(wider) / architectures.flops_per_image(default) < 1.6
    with pytest.raises(SystemExit, match="seed architecture is fixed"):
        train(TrainConfig(tmp_path, tmp_path, arch="seed", width=40))


def test_input_pool_sets_the_internal_resolution_of_sepcnn_only(tmp_path: Path) -> None:
    from training import architectures
    from training.train import TrainConfig, train

    default = architectures.build("sepcnn")
    coarser = architectures.build("sepcnn", input_pool=3)
    assert default.get_layer("to_112").output.shape[1:3] == (112, 112)
    assert coarser.get_layer("to_74").output.shape[1:3] == (74, 74)
    assert coarser.count_params() == default.count_params()  # same weights, fewer positions
    ratio = architectures.flops_per_image(coarser) / architectures.flops_per_image(default)
    assert 0.35 < ratio < 0.5
    with pytest.raises(SystemExit, match="seed architecture is fixed"):
        train(TrainConfig(tmp_path, tmp_path, arch="seed", input_pool=3))
    with pytest.raises(SystemExit, match="--input-pool must be"):
        train(TrainConfig(tmp_path, tmp_path, input_pool=0))


def test_mixup_blends_images_labels_and_class_weights_by_the_same_amount() -> None:
    import tensorflow as tf

    from training.augmentation import mixup_fn

    tf.random.set_seed(3)
    n = 64
    labels = np.array([0.0, 1.0] * (n // 2), np.float32)
    # Each image is filled with its own label (0 or 1), so its mixed value is its lam-blend.
    images = np.broadcast_to(labels[:, None, None, None], (n, 224, 224, 1)).astype(np.float32)
    mixed, soft, weight = mixup_fn(0.4, {0: 3.0, 1: 1.0})(tf.constant(images), tf.constant(labels))
    mixed, soft, weight = mixed.numpy(), soft.numpy(), weight.numpy()
    assert mixed.shape == images.shape and soft.shape == weight.shape == (n,)
    # The image blend, the label blend and the weight blend use one lam per example:
    # weight = 3 - 2 * (share of PNEUMONIA) when NORMAL weighs 3 and PNEUMONIA 1.
    assert np.allclose(mixed[:, 0, 0, 0], soft, atol=1e-6)
    assert np.allclose(mixed.min(axis=(1, 2, 3)), mixed.max(axis=(1, 2, 3)))
    assert np.allclose(weight, 3.0 - 2.0 * soft, atol=1e-5)
    assert ((soft >= 0) & (soft <= 1)).all()
    # Some pairs blend; same-class pairs and lam near 0 or 1 (Beta(0.4)) stay near 0 or 1.
    assert 0 < ((soft > 0.01) & (soft < 0.99)).sum() < n


def test_average_last_epochs_keeps_only_the_last_ones() -> None:
    import keras

    from training.train import AverageLastEpochs

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    average = AverageLastEpochs(2)
    average.set_model(model)
    with pytest.raises(RuntimeError, match="no epoch"):
        average.average()
    for epoch in range(3):  # kernels 0, 1, 2: the mean of the last two is 1.5
        model.layers[0].kernel.assign([[float(epoch)]])
        average.on_epoch_end(epoch)
    kernel, _bias = average.average()
    assert float(kernel[0, 0]) == pytest.approx(1.5)


def test_batchnorm_recalibration_is_the_exact_average_over_the_batches() -> None:
    import keras
    import tensorflow as tf

    from training.batchnorm import recalibrate_batchnorm

    inputs = keras.Input((3,))
    bn = keras.layers.BatchNormalization(momentum=0.99)
    model = keras.Model(inputs, bn(inputs))
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc, 2.0, (16, 3)).astype(np.float32) for loc in (1.0, 5.0, 9.0)]
    assert recalibrate_batchnorm(model, (tf.constant(b) for b in batches)) == 3
    expected_mean = np.mean([b.mean(axis=0) for b in batches], axis=0)
    expected_var = np.mean([b.var(axis=0) for b in batches], axis=0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected_mean, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), expected_var, rtol=1e-4)
    assert bn.momentum == 0.99  # restored for any later training
    assert recalibrate_batchnorm(keras.Sequential([keras.Input((1,))]), iter(batches)) == 0


def test_weight_averaging_run_exports_the_average(small_data: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    with pytest.raises(SystemExit, match="two kinds of weight averaging"):
        main(tiny_run(small_data, store, "--swa-epochs", "2", "--ema", "0.99"))
    run = tiny_run(small_data, store, "--swa-epochs", "2", "--limit", "6", "--weight-decay", "3e-3")
    run[run.index("--epochs") + 1] = "3"
    assert main(run) == 0
    training = json.loads((store / "pneumonia" / "1" / "model.json").read_text())["training"]
    assert training["swa_epochs"] == 2 and training["epochs_run"] == 3
    assert training["weight_decay"] == 3e-3
    assert training["selection_monitor"].startswith("mean weights of the last 2 epochs")
    from training.card import render

    assert "3 epochs (weights averaged over the last 2 epochs)" in render(store / "pneumonia/1")


def test_swa_learning_rate_holds_during_the_averaged_epochs() -> None:
    from training.train import TrainConfig, learning_rate_schedule

    steps = 10
    base = TrainConfig(data=Path("."), model_store=Path("."), epochs=40, swa_epochs=10)
    cosine = learning_rate_schedule(base, steps)
    assert float(cosine(0)) == pytest.approx(2e-3)
    assert float(cosine(steps * 30)) == pytest.approx(2e-3 * (0.02 + 0.98 * 0.5 * (1 - 0.5**0.5)))
    assert float(cosine(steps * 40)) == pytest.approx(2e-3 * 0.02)
    held = learning_rate_schedule(replace(base, swa_lr=5e-4), steps)
    assert float(held(0)) == pytest.approx(2e-3)
    assert float(held(steps * 15)) == pytest.approx(5e-4 + (2e-3 - 5e-4) * 0.5)
    for step in (steps * 30, steps * 31, steps * 35, steps * 40 - 1):
        assert float(held(step)) == pytest.approx(5e-4)


def test_swa_learning_rate_needs_averaging_and_a_lower_value(
    small_data: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    for extra in (("--swa-epochs", "0", "--swa-lr", "5e-4"), ("--swa-lr", "5e-3")):
        with pytest.raises(SystemExit, match="--swa-lr needs"):
            main(tiny_run(small_data, store, *extra))
    assert not (store / "pneumonia").exists()


def test_paired_views_are_two_augmentations_of_each_image_interleaved() -> None:
    import tensorflow as tf

    from training.augmentation import augment_fn
    from training.consistency import duplicated, paired_views

    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (3, 224, 224, 1)), tf.float32)
    labels = tf.constant([0.0, 1.0, 1.0])
    views, view_labels = paired_views(augment_fn(0))(images, labels)
    assert views.shape == (6, 224, 224, 1)
    assert view_labels.numpy().tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    v = views.numpy()
    assert not np.allclose(v[0], v[1])  # two draws of the augmentation, not one view twice
    # The two views of an image resemble each other more than views of different images.
    same = np.corrcoef(v[0].ravel(), v[1].ravel())[0, 1]
    other = np.corrcoef(v[0].ravel(), v[2].ravel())[0, 1]
    assert same > other + 0.2
    twice, twice_labels = duplicated(images, labels)
    np.testing.assert_array_equal(twice.numpy()[0], twice.numpy()[1])
    np.testing.assert_array_equal(twice.numpy()[4], images.numpy()[2])
    assert twice_labels.numpy().tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]


def test_paired_consistency_loss_is_cross_entropy_plus_the_pairs_divergence() -> None:
    import tensorflow as tf

    from training.consistency import PairedConsistencyLoss, bernoulli_jsd

    def numpy_jsd(p: float, q: float) -> float:
        m = (p + q) / 2
        kl = lambda a: a * np.log(a / m) + (1 - a) * np.log((1 - a) / (1 - m))  # noqa: E731
        return 0.5 * (kl(p) + kl(q))

    assert float(bernoulli_jsd(tf.constant(0.9), tf.constant(0.2))) == pytest.approx(
        numpy_jsd(0.9, 0.2), rel=1e-5
    )
    assert float(bernoulli_jsd(tf.constant(0.3), tf.constant(0.3))) == pytest.approx(0.0, abs=1e-7)
    logits = np.array([[2.0], [-1.0], [0.5], [0.5]], np.float32)  # pairs (2, -1) and (0.5, 0.5)
    labels = np.array([1.0, 1.0, 0.0, 0.0], np.float32)
    per_view = PairedConsistencyLoss(12.0, reduction=None)(labels, logits).numpy()
    p = 1 / (1 + np.exp(-logits.ravel()))
    bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    jsd = numpy_jsd(p[0], p[1])
    np.testing.assert_allclose(per_view, bce + 12.0 * np.array([jsd, jsd, 0, 0]), rtol=1e-5)
    # With identical views (validation) it is plain binary cross-entropy.
    plain = PairedConsistencyLoss(12.0)(labels[2:], logits[2:]).numpy()
    assert plain == pytest.approx(bce[2:].mean(), rel=1e-5)


def test_consistency_run_trains_exports_and_refuses_what_it_cannot_pair(
    small_data: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    for extra in (
        ("--consistency", "12", "--mixup", "0.2"),
        ("--consistency", "12", "--no-augment"),
        ("--consistency", "12", "--strategy", "mirrored"),
    ):
        with pytest.raises(SystemExit, match="--consistency"):
            main(tiny_run(small_data, store, *extra))
    assert main(tiny_run(small_data, store, "--consistency", "12", "--swa-epochs", "1")) == 0
    card = json.loads((store / "pneumonia" / "1" / "model.json").read_text())
    assert card["training"]["consistency"] == 12.0
    assert 0.0 <= card["metrics"]["internal_test"]["auc"] <= 1.0


def test_distilled_targets_mix_the_teachers_answer_on_the_augmented_image() -> None:
    import tensorflow as tf

    from training.distillation import distilled_targets

    seen: list[np.ndarray] = []

    def teacher(images: tf.Tensor) -> tf.Tensor:  # brighter image -> higher P(pneumonia)
        seen.append(images.numpy())
        return tf.reduce_mean(images, axis=[1, 2, 3]) / 255.0

    images = tf.constant(np.stack([np.full((8, 8, 1), v, np.float32) for v in (0.0, 51.0, 255.0)]))
    labels = tf.constant([1.0, 0.0, 0.0])
    out_images, soft, weights = distilled_targets(teacher, 0.25, {0: 0.7, 1: 1.9})(images, labels)
    assert np.array_equal(seen[0], images.numpy())  # the teacher scores what the student sees
    assert np.array_equal(out_images.numpy(), images.numpy())
    assert soft.numpy() == pytest.approx([0.75, 0.25 * 0.2, 0.25], abs=1e-6)
    assert weights.numpy() == pytest.approx([1.9, 0.7, 0.7])  # by the hard label


def test_distillation_run_exports_and_refuses_a_teacher_from_another_split(
    small_data: Path, tmp_path: Path, capsys
) -> None:
    store = tmp_path / "store"
    assert main(tiny_run(small_data, store, "--swa-epochs", "1")) == 0
    teacher = store / "pneumonia" / "1"
    with pytest.raises(SystemExit, match="--teacher"):
        main(tiny_run(small_data, store, "--teacher", str(teacher), "--mixup", "0.2"))
    with pytest.raises(SystemExit, match="--distill"):
        main(tiny_run(small_data, store, "--teacher", str(teacher), "--distill", "0"))
    # Another split seed: the teacher saw images that are this run's validation or test.
    assert main(tiny_run(small_data, store, "--teacher", str(teacher), "--seed", "7")) == 2
    assert "another split" in capsys.readouterr().err
    assert main(tiny_run(small_data, store, "--teacher", str(teacher), "--distill", "0.5")) == 0
    card = json.loads((store / "pneumonia" / "2" / "model.json").read_text())
    assert card["training"]["teacher"]["version"] == 1
    assert card["training"]["distill"] == 0.5
    assert 0.0 <= card["metrics"]["internal_test"]["auc"] <= 1.0


def test_a_distillation_runs_training_auc_counts_soft_targets_by_their_side_of_one_half() -> None:
    import keras

    from training.distillation import HardTargetAUC

    soft = np.array([0.9, 0.6, 0.3, 0.05], np.float32)  # labels 1, 1, 0, 0 mixed with a teacher
    logits = np.array([2.0, -1.0, 0.5, -3.0], np.float32)
    hard_auc = keras.metrics.AUC(from_logits=True)
    hard_auc.update_state((soft >= 0.5).astype(np.float32), logits)
    metric = HardTargetAUC(from_logits=True)
    metric.update_state(soft, logits)
    assert float(metric.result()) == pytest.approx(float(hard_auc.result()))
    assert float(metric.result()) == pytest.approx(0.75, abs=0.01)


def test_fused_batchnorm_trains_exactly_as_keras_batchnorm() -> None:
    import keras
    import tensorflow as tf

    from training.batchnorm import FusedBatchNormalization, recalibrate_batchnorm

    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(3.0, 2.0, (8, 5, 6, 4)).astype(np.float32))
    weights = tf.constant(rng.normal(size=(8, 5, 6, 4)).astype(np.float32))
    layers = []
    for cls in (keras.layers.BatchNormalization, FusedBatchNormalization):
        layer = cls(momentum=0.9, name="bn")
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, 4))
        layer.beta.assign(np.linspace(-1.0, 1.0, 4))
        layers.append(layer)
    results = []
    for layer in layers:
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x, training=True)) * weights)
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append([layer(x, training=True), *grads, layer.moving_mean, layer.moving_variance])
    keras_bn, fused = results
    for a, b in zip(keras_bn, fused, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
    # Biased batch variance, as Keras averages it: 0.9 * 1 + 0.1 * var, twice.
    expected = 1.0 + (1 - 0.9**2) * (x.numpy().var(axis=(0, 1, 2)) - 1.0)
    np.testing.assert_allclose(layers[1].moving_variance.numpy(), expected, rtol=1e-4)
    # Inference and frozen layers take Keras' own path: moving statistics, no update.
    frozen = layers[1]
    frozen.trainable = False
    before = frozen.moving_mean.numpy().copy()
    np.testing.assert_allclose(
        np.asarray(frozen(x, training=True)), np.asarray(layers[0](x, training=False)), atol=1e-5
    )
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), before)
    # Recalibration sets the momentum per batch; the fused layer reads it at each call.
    frozen.trainable = True
    inputs = keras.Input(x.shape[1:])
    model = keras.Model(inputs, frozen(inputs))
    assert recalibrate_batchnorm(model, [x[:4], x[4:]]) == 2
    halves = [x.numpy()[:4].mean(axis=(0, 1, 2)), x.numpy()[4:].mean(axis=(0, 1, 2))]
    np.testing.assert_allclose(frozen.moving_mean.numpy(), np.mean(halves, axis=0), rtol=1e-5)


def test_sepcnn_uses_the_fused_batchnorm_under_its_keras_names() -> None:
    from training import architectures
    from training.batchnorm import FusedBatchNormalization, batchnorm_layers

    model = architectures.build("sepcnn")
    bns = batchnorm_layers(model)
    assert bns and all(isinstance(layer, FusedBatchNormalization) for layer in bns)
    assert "stem_bn/moving_variance" in {weight.path for weight in model.weights}


def test_ensemble_publishes_the_average_of_calibrated_logits(
    small_data: Path, tmp_path: Path, capsys
) -> None:
    import tensorflow as tf

    from app.model_store import verify_version
    from training.card import render
    from training.metrics import logit, sigmoid

    store = tmp_path / "store"
    for init_seed in ("1", "2"):
        assert main(tiny_run(small_data, store, "--swa-epochs", "1", "--init-seed", init_seed)) == 0
    assert main(tiny_run(small_data, store, "--swa-epochs", "1", "--seed", "7")) == 0
    first, second, other_split = (store / "pneumonia" / v for v in ("1", "2", "3"))
    ensemble = ["ensemble", "--data", str(small_data), "--model-store", str(store)]
    with pytest.raises(SystemExit, match="at least two"):
        main([*ensemble, str(first)])
    with pytest.raises(SystemExit, match="named twice"):
        main([*ensemble, str(first), str(first)])
    with pytest.raises(SystemExit, match="different patient splits"):
        main([*ensemble, str(first), str(other_split)])
    assert main([*ensemble, str(first), str(second)]) == 0
    folder = store / "pneumonia" / "4"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
        "published": str(folder)
    }
    card = verify_version(folder)  # checksums written over every file
    assert card["architecture"] == "ensemble"
    assert [m["version"] for m in card["members"]] == [1, 2]
    assert card["training"]["fit_seconds"] == pytest.approx(
        sum(m["training"]["fit_seconds"] for m in card["members"]), abs=0.2
    )
    assert (folder / "split.json").read_bytes() == (first / "split.json").read_bytes()
    assert "average of 2 versions" in render(folder)

    # Plain TensorFlow: the published graph is the mean of the members' calibrated logits,
    # divided by the ensemble's own temperature; the first member's out-of-distribution score.
    images = np.stack(
        [load_path(p) for p in sorted((small_data / "train" / "NORMAL").iterdir())[:4]]
    )[..., None]

    def serve(version: Path) -> dict[str, np.ndarray]:
        signature = tf.saved_model.load(str(version)).signatures["serving_default"]
        return {k: v.numpy() for k, v in signature(pixels=tf.constant(images)).items()}

    out, one, two = serve(folder), serve(first), serve(second)
    assert out["probabilities"].shape == (4, 2)
    mean = (logit(one["probabilities"][:, 1]) + logit(two["probabilities"][:, 1])) / 2
    np.testing.assert_allclose(
        out["probabilities"][:, 1], sigmoid(mean / card["temperature"]), atol=1e-4
    )
    np.testing.assert_allclose(out["ood_score"], one["ood_score"], rtol=1e-4)
    assert (
        card["ood"]["threshold"]
        == json.loads((first / "model.json").read_text())["ood"]["threshold"]
    )

    # The service serves it like any version: the newest, with the out-of-distribution check.
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import API_KEY, make_settings

    settings = make_settings(store, tmp_path / "service")
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
        path = sorted((small_data / "train" / "PNEUMONIA").iterdir())[0]
        response = client.post("/predict", files={"file": (path.name, path.read_bytes())})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["version"] == 4
    assert body["out_of_distribution"]["threshold"] == card["ood"]["threshold"]
