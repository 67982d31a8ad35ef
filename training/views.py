"""Geometric test-time views of a uint8 radiograph batch, in TensorFlow.

Used by the experiment that scored test-time augmentation on validation
(docs/experiments/tta_validation.py); no candidate won, so no exported model uses views. Kept
here, tested, so that a later candidate is built from the same code the experiment measured.
A view maps uint8 [N, 224, 224, 1] to uint8 [N, 224, 224, 1]: TensorFlow's bilinear resize
(half-pixel centres; within 2 grey levels of Pillow's on smooth images, which antialiases when
shrinking), rounded back to uint8 so that the model sees what it would see from a decoded file.
"""

from __future__ import annotations

import tensorflow as tf

from app.imaging import TARGET_SIZE


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def zoom_out(images: tf.Tensor, fraction: float) -> tf.Tensor:
    """Shrink the image to (1 - fraction) of each side and centre it on black, as the
    training augmentation's zoom-out fills."""
    inner = round(TARGET_SIZE * (1.0 - fraction))
    small = tf.image.resize(tf.cast(images, tf.float32), (inner, inner), method="bilinear")
    before = (TARGET_SIZE - inner) // 2
    after = TARGET_SIZE - inner - before
    padded = tf.pad(small, [[0, 0], [before, after], [before, after], [0, 0]])
    return _to_uint8(padded)


def zoom_in(images: tf.Tensor, fraction: float) -> tf.Tensor:
    """Keep the central (1 - fraction) of each side and resize it back up to 224."""
    inner = round(TARGET_SIZE * (1.0 - fraction))
    start = (TARGET_SIZE - inner) // 2
    crop = tf.cast(images, tf.float32)[:, start : start + inner, start : start + inner, :]
    return _to_uint8(tf.image.resize(crop, (TARGET_SIZE, TARGET_SIZE), method="bilinear"))


def identity(images: tf.Tensor) -> tf.Tensor:
    return tf.convert_to_tensor(images, dtype=tf.uint8)


# The registered candidates (docs/experiments/selection_rule.txt, 2026-12-02).
VIEW_SETS = {
    "A": (identity, lambda x: zoom_out(x, 0.08)),
    "B": (identity, lambda x: zoom_in(x, 0.08)),
    "C": (lambda x: zoom_out(x, 0.05), lambda x: zoom_in(x, 0.05)),
}
