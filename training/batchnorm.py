"""Batch-norm recalibration ("precise BN"): recompute the moving statistics for fixed weights.

Keras keeps an exponential moving average (momentum 0.99) of per-batch statistics taken while the
weights change, so the statistics used at inference lag the weights the run ends with. One pass
over training images with the weights fixed replaces them with the exact average.
"""

from __future__ import annotations

from collections.abc import Iterable

import keras
import tensorflow as tf


def batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def recalibrate_batchnorm(model: keras.Model, batches: Iterable[tf.Tensor]) -> int:
    """Set every batch-norm layer's moving mean and variance to the average of its batch
    statistics over `batches` (float images), with all weights fixed. Returns the batch count."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    count = 0
    try:
        for images in batches:
            count += 1
            for layer in layers:
                # A running mean: batch k enters with weight 1/k, the first replaces the old value.
                layer.momentum = (count - 1) / count
            model(images, training=True)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    return count
