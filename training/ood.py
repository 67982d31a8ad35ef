"""How unlike the training radiographs an input is, seen through the model's own features.

A classifier answers every input with a probability, including noise or an inverted or rotated
radiograph: v2 (and v3, which has its weights) gives uniform noise P(pneumonia) 1.00. The
score here is the Mahalanobis distance of the model's pooled features (the `gap` layer) to
their distribution over the training images (Lee et al., NeurIPS 2018, with one class-agnostic
Gaussian). Like the decision threshold, it treats acquisition shift as in-distribution: the
Gaussian is fitted on the train part of the patient split plus a seeded shifted copy of it
(training.augmentation.shifted_copy), and the flag threshold is a high quantile of the scores on
the selection set (validation + its shifted copy), so about 1 - QUANTILE of radiographs like the
training ones, shifted or not, are flagged. The internal test part only reports flag rates.

Chosen on validation-derived data only (session 10, README "Out-of-distribution flag"): fitted
on the clean train part with the threshold on clean validation, the flag caught more of the
synthetic mistakes (inverted 0.92 vs 0.54) but also flagged 18 % of validation radiographs with
a 10 % black border, an acquisition variation the model handles.

The exported SavedModel computes the score in the same call as the probabilities
(`ood_score`, [N]); the service reports it and flags inputs above the threshold. It does not
change the probabilities, and it is no guarantee: a radiograph of another population (adults,
other machines) can score as typical and still be outside what the model was validated on.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from training.augmentation import PERTURBATIONS, perturb, shifted_copy

FEATURE_LAYER = "gap"
QUANTILE = 0.995
# Ridge added to the covariance, relative to its mean variance: the pooled ReLU features have
# near-constant directions that would otherwise make the precision matrix blow up.
SHRINKAGE = 1e-3
METHOD = (
    "Mahalanobis distance of the model's global-average-pooled features to their mean and "
    "covariance over the training images and a seeded shifted copy of them (one "
    "class-agnostic Gaussian)"
)


@dataclass(frozen=True)
class FeatureStats:
    mean: np.ndarray  # (D,)
    precision: np.ndarray  # (D, D)
    threshold: float

    def distance(self, features: np.ndarray) -> np.ndarray:
        centred = features.astype(np.float64) - self.mean
        squared = np.einsum("ij,jk,ik->i", centred, self.precision, centred)
        return np.sqrt(np.maximum(squared, 0.0))

    def tf_distance(self, features: tf.Tensor) -> tf.Tensor:
        mean = tf.constant(self.mean, tf.float32)
        precision = tf.constant(self.precision, tf.float32)
        centred = features - mean
        squared = tf.reduce_sum(tf.matmul(centred, precision) * centred, axis=1)
        return tf.sqrt(tf.maximum(squared, 0.0))


def feature_model(model: keras.Model) -> keras.Model | None:
    """(pooled features, logit) in one call, or None for an architecture without `gap`."""
    try:
        pooled = model.get_layer(FEATURE_LAYER)
    except ValueError:
        return None
    return keras.Model(model.input, [pooled.output, model.output], name="features")


def features(extractor: keras.Model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].reshape(-1, *extractor.input_shape[1:])
        pooled, _ = extractor(tf.constant(batch, tf.float32), training=False)
        chunks.append(np.asarray(pooled, np.float64))
    return np.concatenate(chunks)


def fit(
    train_features: np.ndarray, validation_features: np.ndarray, quantile: float = QUANTILE
) -> FeatureStats:
    mean = train_features.mean(axis=0)
    covariance = np.cov(train_features - mean, rowvar=False)
    ridge = SHRINKAGE * float(np.trace(covariance)) / len(covariance)
    precision = np.linalg.inv(covariance + ridge * np.eye(len(covariance)))
    partial = FeatureStats(mean, precision, float("inf"))
    threshold = float(np.quantile(partial.distance(validation_features), quantile))
    return FeatureStats(mean, precision, threshold)


def synthetic_inputs(images: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs a hospital integration can send by mistake, made from real radiographs (uint8
    (N, 224, 224)): the wrong photometric interpretation, the wrong orientation, a scrambled
    image, and non-radiographs (noise, a smooth gradient)."""
    rng = np.random.default_rng(seed)
    n = len(images)
    tiles = images.reshape(n, 4, 56, 4, 56).transpose(0, 1, 3, 2, 4).reshape(n, 16, 56, 56)
    shuffled = np.stack([t[rng.permutation(16)] for t in tiles])
    shuffled = shuffled.reshape(n, 4, 4, 56, 56).transpose(0, 1, 3, 2, 4).reshape(n, 224, 224)
    ramp = np.linspace(0, 255, 224).astype(np.uint8)
    return {
        "inverted": 255 - images,
        "rotated_90": np.rot90(images, 1, axes=(1, 2)).copy(),
        "upside_down": images[:, ::-1].copy(),
        "tiles_shuffled": shuffled,
        "uniform_noise": rng.integers(0, 256, images.shape, dtype=np.uint8),
        "gradient": np.broadcast_to(ramp[None, None, :], images.shape).copy(),
    }


def flag_rate(stats: FeatureStats, extractor: keras.Model, images: np.ndarray) -> float:
    return round(float(np.mean(stats.distance(features(extractor, images)) > stats.threshold)), 4)


def card_section(
    stats: FeatureStats,
    n_train: int,
    rates: dict[str, object],
) -> dict[str, object]:
    return {
        "method": METHOD,
        "feature_layer": FEATURE_LAYER,
        "fitted_on": f"the train part of the patient split ({n_train} images) and a seeded "
        "shifted copy of it",
        "threshold": round(stats.threshold, 4),
        "threshold_rule": f"{QUANTILE:.1%} quantile of the scores on the selection set "
        "(validation + seeded shifted copy)",
        "output": "ood_score",
        "flag_rates": rates,
        "limits": "Flags inputs far from the training images in the model's feature space "
        "(wrong photometric interpretation or orientation, non-radiographs). A typical score "
        "does not mean the model was validated for that patient population or equipment.",
    }


def report(
    stats: FeatureStats,
    extractor: keras.Model,
    parts: dict[str, np.ndarray],
    perturbed: dict[str, np.ndarray],
    synthetic_base: np.ndarray,
    seed: int = 0,
) -> dict[str, object]:
    """Flag rates on the split parts, on perturbed radiographs (acquisition shifts the model
    should still take) and on synthetic mistakes made from `synthetic_base` (which it should
    flag)."""
    rates: dict[str, object] = {name: flag_rate(stats, extractor, x) for name, x in parts.items()}
    rates["perturbed_validation"] = {
        name: flag_rate(stats, extractor, x) for name, x in perturbed.items()
    }
    base = synthetic_base.reshape(-1, 224, 224)
    rates["synthetic_mistakes"] = {
        name: flag_rate(stats, extractor, x)
        for name, x in synthetic_inputs(base, seed=seed).items()
    }
    return rates


def fit_and_report(
    extractor: keras.Model,
    x_train: np.ndarray,
    x_val: np.ndarray,
    x_test: np.ndarray,
    seed: int,
) -> tuple[FeatureStats, dict[str, object]]:
    """The score's statistics and threshold, with the card section reporting its flag rates."""
    train_features = features(extractor, np.concatenate([x_train, shifted_copy(x_train, seed)]))
    selection = features(extractor, np.concatenate([x_val, shifted_copy(x_val, seed)]))
    stats = fit(train_features, selection)
    rates = report(
        stats,
        extractor,
        {"validation": x_val, "internal_test": x_test},
        {name: perturb(x_val, name, seed) for name in PERTURBATIONS},
        synthetic_base=x_test[:200],
        seed=seed,
    )
    return stats, card_section(stats, len(x_train), rates)
