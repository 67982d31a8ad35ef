"""Distillation from a published model (`train --teacher model_store/<name>/<v> --distill W`).

The student trains on the same augmented batches as any run, against targets
(1 - W) x label + W x the teacher's calibrated P(pneumonia) for that very augmented image: the
teacher's answer on the view the student sees, not on the clean image (Beyer et al. 2022,
"Knowledge distillation: a good teacher is patient and consistent"). With a teacher of the
student's own architecture this is a born-again network (Furlanello et al. 2018): a second
model that learns the first one's soft answers as well as the labels.

The teacher must have been trained on the same patient split (its card's data manifest equals
the student's): a teacher that saw the student's validation or internal test images would leak
them into training. The class weights follow the hard label, as per-sample weights
(`label_weights`, as mixup carries them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
import tensorflow as tf

from training.augmentation import label_weights
from training.data import DataError

Teacher = Callable[[tf.Tensor], tf.Tensor]


def load_teacher(folder: Path, manifest_sha256: str) -> tuple[Teacher, dict]:
    """The teacher's `serving_default` as images (float, 0..255) -> calibrated P(pneumonia),
    and a short record of it for the card. Refuses a teacher from another split."""
    from app.model_store import ModelStoreError, verify_version

    try:
        card = verify_version(folder)
    except (ModelStoreError, OSError, ValueError) as exc:
        raise DataError(f"--teacher {folder}: not a valid store version ({exc})") from exc
    teacher_manifest = card.get("data", {}).get("manifest_sha256")
    if teacher_manifest != manifest_sha256:
        raise DataError(
            f"--teacher {folder} was trained on another split (data manifest "
            f"{str(teacher_manifest)[:12]}, this run {manifest_sha256[:12]}): it would have seen "
            "this run's validation or internal test images"
        )
    loaded = tf.saved_model.load(str(folder))  # kept by the closure: it owns the variables

    def probability(images: tf.Tensor) -> tf.Tensor:
        pixels = tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.uint8)
        return loaded.signatures["serving_default"](pixels=pixels)["probabilities"][:, 1]

    record = {
        "path": str(folder),
        "name": card.get("name"),
        "version": card.get("version"),
        "created": card.get("created"),
        "temperature": card.get("temperature"),
    }
    return probability, record


def distilled_targets(
    teacher: Teacher, weight: float, class_weight: dict[int, float]
) -> Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
    """(augmented images, labels) -> (images, soft targets, per-sample class weights)."""

    def targets(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        soft = (1.0 - weight) * labels + weight * tf.stop_gradient(teacher(images))
        return images, soft, label_weights(labels, class_weight)

    return targets


class HardTargetAUC(keras.metrics.AUC):
    """AUC that counts a target >= 0.5 as a positive. Keras' own counts every non-zero target as
    one, which with soft targets (none is ever exactly 0) leaves no negatives and reads 0.
    Validation labels are 0 or 1, where both agree."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        hard = tf.cast(tf.convert_to_tensor(y_true) >= 0.5, tf.float32)
        return super().update_state(hard, y_pred, sample_weight=sample_weight)
