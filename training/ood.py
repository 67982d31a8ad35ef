"""How unlike the training radiographs an input is, seen through the model's own features.

A classifier answers every input with a probability, including noise or an inverted or rotated
radiograph: v2's weights give uniform noise P(pneumonia) 1.00. The score here follows Lee et
al. (NeurIPS 2018) with one class-agnostic Gaussian per layer. It takes the Mahalanobis distance
of the model's pooled features to their distribution over the training images, for each layer in
FEATURE_LAYERS, divides each by that layer's QUANTILE on the selection set, and keeps the largest
ratio.

Like the decision threshold, it treats acquisition shift as in-distribution. The Gaussians are
fitted on the train part of the patient split plus a seeded shifted copy of it
(training.augmentation.shifted_copy). The scales and the flag threshold are quantiles on the
selection set (validation + its shifted copy), so about 1 - QUANTILE of radiographs like the
training ones, shifted or not, are flagged. The internal test part only reports flag rates.

Chosen on validation-derived data only (session 10; docs/experiments/ood_variants.py and the
README's "Out-of-distribution flag"):
- Fitted on clean data, `gap` alone flagged 18 % of validation radiographs with a 10 % black
  border, an acquisition variation the model handles.
- With the shifted copies, `gap` alone (v3) caught only half of the inverted radiographs.
- Adding stage 2 (v4) caught all inverted and rotated ones and 95 % of the scrambled ones, with
  at most 3 % of any perturbed validation condition flagged.

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

# Pooled features of the last stage before the head (`gap`) and of the stage before it: the
# earlier stage still sees intensity and layout (an inverted or scrambled radiograph), which the
# last one has largely abstracted away (session 10, README "Out-of-distribution flag").
FEATURE_LAYERS = ("s2_1_relu", "gap")
FINAL_LAYER = "gap"
QUANTILE = 0.995
# Ridge added to each covariance, relative to its mean variance: the pooled ReLU features have
# near-constant directions that would otherwise make the precision matrix blow up.
SHRINKAGE = 1e-3
METHOD = (
    "Mahalanobis distance of the model's pooled features to their mean and covariance over the "
    "training images and a seeded shifted copy of them (one class-agnostic Gaussian per "
    "layer), each divided by its own 99.5 % quantile on the selection set; the score is the "
    "largest of these ratios"
)


@dataclass(frozen=True)
class LayerGaussian:
    mean: np.ndarray  # (D,)
    precision: np.ndarray  # (D, D)
    scale: float  # this layer's distance at QUANTILE on the selection set

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


@dataclass(frozen=True)
class FeatureStats:
    layers: tuple[LayerGaussian, ...]
    threshold: float

    def distance(self, features: list[np.ndarray]) -> np.ndarray:
        """The score: the largest per-layer distance relative to its layer's scale."""
        ratios = [g.distance(f) / g.scale for g, f in zip(self.layers, features, strict=True)]
        return np.max(np.stack(ratios), axis=0)

    def tf_distance(self, features: list[tf.Tensor]) -> tf.Tensor:
        ratios = [
            g.tf_distance(f) / tf.constant(g.scale, tf.float32)
            for g, f in zip(self.layers, features, strict=True)
        ]
        return tf.reduce_max(tf.stack(ratios), axis=0)


def feature_model(
    model: keras.Model, layers: tuple[str, ...] = FEATURE_LAYERS
) -> keras.Model | None:
    """([pooled features per layer], logit) in one call: the `layers` the model has, spatially
    averaged; None for an architecture without the final `gap` layer."""
    names = {layer.name for layer in model.layers}
    if FINAL_LAYER not in names:
        return None
    pooled = []
    for name in layers:
        if name not in names:
            continue
        output = model.get_layer(name).output
        pooled.append(keras.ops.mean(output, axis=(1, 2)) if len(output.shape) == 4 else output)
    return keras.Model(model.input, [pooled, model.output], name="features")


def layer_names(extractor: keras.Model) -> list[str]:
    """The FEATURE_LAYERS a feature model scores, in its output order."""
    present = {layer.name for layer in extractor.layers}
    return [name for name in FEATURE_LAYERS if name in present]


def features(extractor: keras.Model, images: np.ndarray, batch_size: int = 64) -> list[np.ndarray]:
    chunks: list[list[np.ndarray]] = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].reshape(-1, *extractor.input_shape[1:])
        pooled, _ = extractor(tf.constant(batch, tf.float32), training=False)
        chunks.append([np.asarray(p, np.float64) for p in pooled])
    return [np.concatenate(layer) for layer in zip(*chunks, strict=True)]


def fit_layer(train: np.ndarray, selection: np.ndarray, quantile: float) -> LayerGaussian:
    mean = train.mean(axis=0)
    covariance = np.atleast_2d(np.cov(train - mean, rowvar=False))
    ridge = SHRINKAGE * float(np.trace(covariance)) / len(covariance)
    precision = np.linalg.inv(covariance + ridge * np.eye(len(covariance)))
    unscaled = LayerGaussian(mean, precision, 1.0)
    scale = float(np.quantile(unscaled.distance(selection), quantile))
    return LayerGaussian(mean, precision, max(scale, 1e-12))


def fit(
    train_features: list[np.ndarray],
    selection_features: list[np.ndarray],
    quantile: float = QUANTILE,
) -> FeatureStats:
    """One Gaussian per layer; the threshold is the score's quantile on the selection set."""
    layers = tuple(
        fit_layer(train, selection, quantile)
        for train, selection in zip(train_features, selection_features, strict=True)
    )
    partial = FeatureStats(layers, float("inf"))
    return FeatureStats(layers, float(np.quantile(partial.distance(selection_features), quantile)))


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
    extractor: keras.Model,
    n_train: int,
    rates: dict[str, object],
) -> dict[str, object]:
    return {
        "method": METHOD,
        "feature_layers": layer_names(extractor),
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
    return stats, card_section(stats, extractor, len(x_train), rates)
