"""Training-time augmentation (random, in TensorFlow) and the fixed acquisition perturbations
(seeded, in Pillow/NumPy) that model selection and the robustness report use."""

from __future__ import annotations

import io
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from PIL import Image, ImageFilter

from app.imaging import TARGET_SIZE

# The largest zoom-in per axis of 'basic' augmentation (v1 and v2) and of 'framing'.
BASIC_ZOOM_IN = 0.15


def geometric_layers(seed: int, zoom_in: float = BASIC_ZOOM_IN) -> keras.Sequential:
    """Small rotations, shifts, zoom and aspect changes, like other machines' positioning.
    `zoom_in` is the largest magnification per axis (0.15: up to 15 % of each side's view lost
    to a tighter field)."""
    return keras.Sequential(
        [
            layers_random_rotation(seed),
            keras.layers.RandomTranslation(0.06, 0.06, fill_mode="constant", seed=seed + 1),
            keras.layers.RandomZoom(
                (-zoom_in, 0.12), (-zoom_in, 0.12), fill_mode="constant", seed=seed + 2
            ),
        ],
        name="geometric",
    )


def layers_random_rotation(seed: int) -> keras.layers.Layer:
    return keras.layers.RandomRotation(8 / 360, fill_mode="constant", seed=seed)


def photometric(images: tf.Tensor, seed: int) -> tf.Tensor:
    """Exposure differences: gamma, contrast, brightness, blur and noise on 0..255 floats."""
    n = tf.shape(images)[0]
    x = images / 255.0
    gamma = tf.exp(tf.random.uniform([n, 1, 1, 1], -0.45, 0.45))
    x = tf.pow(tf.clip_by_value(x, 1e-4, 1.0), gamma)
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    contrast = tf.random.uniform([n, 1, 1, 1], 0.65, 1.35)
    x = (x - mean) * contrast + mean + tf.random.uniform([n, 1, 1, 1], -0.1, 0.1)
    blurred = tf.nn.avg_pool2d(x, 3, 1, "SAME")
    blur_mix = tf.cast(tf.random.uniform([n, 1, 1, 1]) < 0.25, tf.float32)
    x = blur_mix * blurred + (1.0 - blur_mix) * x
    sigma = tf.random.uniform([n, 1, 1, 1], 0.0, 0.03)
    x = x + tf.random.normal(tf.shape(x)) * sigma
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def _boxes(n: tf.Tensor, y0, x0, h, w) -> tf.Tensor:
    """Boolean masks [n, 224, 224, 1] of axis-aligned boxes given per-image corners and sizes."""
    rows = tf.reshape(tf.range(TARGET_SIZE, dtype=tf.float32), [1, -1, 1, 1])
    cols = tf.reshape(tf.range(TARGET_SIZE, dtype=tf.float32), [1, 1, -1, 1])
    return (rows >= y0) & (rows < y0 + h) & (cols >= x0) & (cols < x0 + w)


def _per_image_uniform(n: tf.Tensor) -> Callable[[float, float], tf.Tensor]:
    """Draws of one uniform value per image, [n, 1, 1, 1], broadcastable over its pixels."""
    return lambda low, high: tf.random.uniform([n, 1, 1, 1], low, high)


def acquisition_artifacts(images: tf.Tensor) -> tf.Tensor:
    """What other sites burn into the image, on 0..255 floats: bright text and side markers
    near the edges (half the images) and a bright unexposed collimation band along one side
    (a fifth of them)."""
    n = tf.shape(images)[0]
    u = _per_image_uniform(n)
    x = images
    for _ in range(2):
        h, w = u(5.0, 16.0), u(8.0, 40.0)
        top = tf.cast(u(0.0, 1.0) < 0.5, tf.float32)
        y0 = top * u(2.0, 30.0) + (1.0 - top) * u(TARGET_SIZE - 46.0, TARGET_SIZE - 16.0)
        x0 = u(2.0, TARGET_SIZE - 42.0)
        on = u(0.0, 1.0) < 0.5
        x = tf.where(_boxes(n, y0, x0, h, w) & on, u(200.0, 255.0), x)
    width = u(4.0, 22.0)
    side = tf.floor(u(0.0, 4.0))  # 0 top, 1 bottom, 2 left, 3 right
    full = tf.fill([n, 1, 1, 1], float(TARGET_SIZE))
    zero = tf.zeros([n, 1, 1, 1])
    y0 = tf.where(side == 1.0, TARGET_SIZE - width, zero)
    x0 = tf.where(side == 3.0, TARGET_SIZE - width, zero)
    h = tf.where(side < 2.0, width, full)
    w = tf.where(side < 2.0, full, width)
    on = u(0.0, 1.0) < 0.2
    return tf.where(_boxes(n, y0, x0, h, w) & on, u(150.0, 255.0), x)


def random_erase(images: tf.Tensor, probability: float = 0.5) -> tf.Tensor:
    """Cutout / random erasing (DeVries & Taylor 2017; Zhong et al. 2020) on 0..255 floats:
    one box of 10-40 % of each side, anywhere, set to one random grey level, on `probability`
    of the images. A call that rests on one region (a marker, an edge of the field) then has to
    be made from what is left."""
    n = tf.shape(images)[0]
    u = _per_image_uniform(n)
    h, w = u(0.1, 0.4) * TARGET_SIZE, u(0.1, 0.4) * TARGET_SIZE
    y0, x0 = u(0.0, 1.0) * (TARGET_SIZE - h), u(0.0, 1.0) * (TARGET_SIZE - w)
    on = u(0.0, 1.0) < probability
    return tf.where(_boxes(n, y0, x0, h, w) & on, u(0.0, 255.0), images)


AUGMENTATIONS = ("basic", "shift", "framing", "erase")
# 'framing': tighter collimation than 'basic' allows, up to a quarter of each axis's view lost
# (lost on the selection rule in session 7; docs/training-history.md).
FRAMING_ZOOM_IN = 0.25


def augment_fn(
    seed: int, level: str = "basic"
) -> Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """'basic' is the v1 recipe (geometry + exposure); 'shift' adds left-right flips and the
    markers and collimation bands of other sites; 'framing' is 'basic' with a wider zoom-in
    range (tighter fields of view); 'erase' is 'basic' with one random box erased (before the
    exposure changes, which then apply to it too) on half the images."""
    if level not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {level!r}; choose from {AUGMENTATIONS}")
    geometric = geometric_layers(seed, FRAMING_ZOOM_IN if level == "framing" else BASIC_ZOOM_IN)
    flip = keras.layers.RandomFlip("horizontal", seed=seed + 3)

    def augment(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        images = tf.cast(images, tf.float32)
        images = geometric(images, training=True)
        if level == "shift":
            images = acquisition_artifacts(flip(images, training=True))
        elif level == "erase":
            images = random_erase(images)
        return photometric(images, seed), labels

    return augment


def label_weights(labels: tf.Tensor, class_weight: dict[int, float]) -> tf.Tensor:
    """The balanced class weights as per-sample weights of each hard (0/1) label, for batches
    whose targets become soft (mixup, distillation), where Keras' `class_weight` would round."""
    weights = tf.constant([class_weight[0], class_weight[1]], tf.float32)
    return tf.gather(weights, tf.cast(labels, tf.int32))


def mixup_fn(
    alpha: float, class_weight: dict[int, float]
) -> Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
    """Mixup (Zhang et al. 2018) within each batch: every image is blended with another one of
    the batch by lam ~ Beta(alpha, alpha), and so are its label and its class weight (the
    balanced weights become per-sample weights, so mixed pairs keep the class balance)."""

    def mix(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        n = tf.shape(images)[0]
        first = tf.random.gamma([n], alpha)
        lam = first / (first + tf.random.gamma([n], alpha))
        partner = tf.random.shuffle(tf.range(n))
        sample_weight = label_weights(labels, class_weight)
        keep = tf.reshape(lam, [-1, 1, 1, 1])
        images = keep * images + (1.0 - keep) * tf.gather(images, partner)
        labels = lam * labels + (1.0 - lam) * tf.gather(labels, partner)
        sample_weight = lam * sample_weight + (1.0 - lam) * tf.gather(sample_weight, partner)
        return images, labels, sample_weight

    return mix


# ---- fixed, seeded acquisition perturbations (uint8 (224, 224) -> uint8 (224, 224)) ----


def _lut(pixels: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return np.clip(np.rint(fn(pixels.astype(np.float64))), 0, 255).astype(np.uint8)


def _resize(image: Image.Image) -> np.ndarray:
    return np.asarray(image.resize((TARGET_SIZE, TARGET_SIZE), Image.Resampling.BILINEAR))


def gamma(value: float) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    return lambda p, rng: _lut(p, lambda x: 255.0 * (x / 255.0) ** value)


def contrast(value: float) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    return lambda p, rng: _lut(p, lambda x: (x - x.mean()) * value + x.mean())


def window(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    low, high = np.percentile(p, (8, 92))
    return _lut(p, lambda x: (x - low) * 255.0 / max(high - low, 1.0))


def blur(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(Image.fromarray(p).filter(ImageFilter.GaussianBlur(1.5)))


def noise(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _lut(p, lambda x: x + rng.normal(0.0, 10.0, x.shape))


def zoom_in(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    m = int(TARGET_SIZE * 0.08)
    return _resize(Image.fromarray(p).crop((m, m, TARGET_SIZE - m, TARGET_SIZE - m)))


def border(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    m = int(TARGET_SIZE * 0.1)
    canvas = Image.new("L", (TARGET_SIZE + 2 * m, TARGET_SIZE + 2 * m), 0)
    canvas.paste(Image.fromarray(p), (m, m))
    return _resize(canvas)


def aspect(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    m = int(TARGET_SIZE * 0.1)
    return _resize(Image.fromarray(p).crop((m, 0, TARGET_SIZE - m, TARGET_SIZE)))


def jpeg(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(p).save(buffer, format="JPEG", quality=30)
    return np.asarray(Image.open(buffer).convert("L"))


PERTURBATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "gamma_0.6": gamma(0.6),
    "gamma_1.6": gamma(1.6),
    "contrast_0.6": contrast(0.6),
    "window_8_92": window,
    "blur_1.5": blur,
    "noise_10": noise,
    "zoom_in_16pct": zoom_in,
    "border_10pct": border,
    "aspect_80pct": aspect,
    "jpeg_q30": jpeg,
}


def perturb(images: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    """Apply one named perturbation to a batch (N, 224, 224, 1) of uint8 images."""
    rng = np.random.default_rng(seed)
    fn = PERTURBATIONS[name]
    return np.stack([fn(image[:, :, 0], rng) for image in images])[..., None]


def shifted_copy(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """One seeded random perturbation per image: the 'shift-like' half of model selection data."""
    rng = np.random.default_rng(seed)
    names = list(PERTURBATIONS)
    out = np.empty_like(images)
    for index, image in enumerate(images):
        name = names[rng.integers(len(names))]
        out[index, :, :, 0] = PERTURBATIONS[name](image[:, :, 0], rng)
    return out
