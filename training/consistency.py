"""Consistency training: two augmented views of every training image, and a loss that asks the
model to give both the same answer (the Jensen-Shannon term of AugMix, Hendrycks et al. 2020).

The selection rule scores how steady a model's calls are under acquisition changes; this
trains for it directly. Views are interleaved in the batch ([a1, b1, a2, b2, ...]) so that the
loss can pair them without any state; validation batches are each image twice, where the term
is zero and the loss is plain cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

EPS = 1e-7


def paired_views(
    augment: Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]],
) -> Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """A batch of N images -> 2N: two independent augmentations of each, interleaved, with
    each label repeated."""

    def views(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        first, _ = augment(images, labels)
        second, _ = augment(images, labels)
        return interleave(first, second), tf.repeat(labels, 2)

    return views


def duplicated(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Each image twice in a row, for validation under the paired loss."""
    return tf.repeat(images, 2, axis=0), tf.repeat(labels, 2)


def interleave(first: tf.Tensor, second: tf.Tensor) -> tf.Tensor:
    stacked = tf.stack([first, second], axis=1)  # [N, 2, ...]
    return tf.reshape(stacked, tf.concat([[-1], tf.shape(first)[1:]], axis=0))


def bernoulli_jsd(p: tf.Tensor, q: tf.Tensor) -> tf.Tensor:
    """Jensen-Shannon divergence (nats) between Bernoulli(p) and Bernoulli(q), elementwise."""
    p = tf.clip_by_value(p, EPS, 1.0 - EPS)
    q = tf.clip_by_value(q, EPS, 1.0 - EPS)
    m = 0.5 * (p + q)

    def kl(a: tf.Tensor) -> tf.Tensor:
        return a * tf.math.log(a / m) + (1.0 - a) * tf.math.log((1.0 - a) / (1.0 - m))

    return 0.5 * (kl(p) + kl(q))


class PairedConsistencyLoss(keras.losses.Loss):
    """Per view: binary cross-entropy on the logit plus `weight` x the Jensen-Shannon
    divergence between the two views of its image (each view of a pair carries the same
    term). Class weights apply per view as usual."""

    def __init__(self, weight: float, name: str = "paired_consistency", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.weight = weight

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        logits = tf.reshape(tf.cast(y_pred, tf.float32), [-1])
        labels = tf.reshape(tf.cast(y_true, tf.float32), [-1])
        cross_entropy = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
        pairs = tf.reshape(tf.sigmoid(logits), [-1, 2])
        divergence = bernoulli_jsd(pairs[:, 0], pairs[:, 1])
        return cross_entropy + self.weight * tf.repeat(divergence, 2)

    def get_config(self) -> dict:
        return {**super().get_config(), "weight": self.weight}
