"""LIME explanations drawn over the preprocessed radiograph.

lime 0.2.0.1's default segmenter wraps scikit-image's quickshift with an argument newer
scikit-image releases removed, so we segment ourselves (SLIC superpixels: compact regions that
follow lung and rib-cage edges, and ~10x faster than quickshift).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries, slic

# 30 superpixels (~40 x 40 px): top-5 regions agree across LIME seeds at 1000 samples with mean
# Jaccard 0.86 (min 0.52) on six radiographs, against 0.47 with 60 and 0.75 with 40.
N_SEGMENTS = 30
HIDDEN_VALUE = 0  # the seed's hide_color
KERNEL_WIDTH = 0.25  # lime_image's default
# Perturbed images per model call. Each call's activations are ~1.6 MB per image, and calls run
# on every model instance at once: 64 kept RSS after explanations near 1 GB (250 reached 1.7 GB
# with two instances) and was no slower (LIME p50 1.5-1.75 s vs 1.9-2.0 s with 125, 2 cores).
PREDICT_BATCH = 64
# Tint for the regions supporting the predicted class: PNEUMONIA red, NORMAL green.
TINTS = {
    "PNEUMONIA": np.array([255, 40, 40], np.float64),
    "NORMAL": np.array([40, 220, 80], np.float64),
}
BOUNDARY = np.array([255, 230, 0], np.float64)


def segment(image: np.ndarray) -> np.ndarray:
    """Superpixels of the (RGB-stacked grayscale) radiograph."""
    return slic(image, n_segments=N_SEGMENTS, compactness=10, start_label=0, channel_axis=-1)


def explain(
    pixels: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    class_names: list[str],
    label: str,
    num_samples: int,
    num_features: int,
    seed: int = 0,
    pool: Executor | None = None,
) -> tuple[np.ndarray, list[int]]:
    """LIME for one radiograph; returns (mask of the regions supporting `label`, segment ids).

    The algorithm of `lime_image.LimeImageExplainer` (random on/off superpixel masks, hidden
    superpixels set to 0, cosine distance to the full image, exponential kernel of width 0.25,
    a weighted ridge fit by `lime.lime_base.LimeBase`), with the perturbed images built in one
    vectorised step instead of lime's per-sample Python loop, which cost more than the model
    (about 3 ms per sample here). With `pool`, the perturbed batches are built and scored
    concurrently on its threads (one model call per core when TensorFlow runs one thread per
    call); the answer does not depend on it.
    """
    from lime import lime_base
    from sklearn.metrics import pairwise_distances

    segments = segment(np.repeat(pixels[:, :, None], 3, axis=2))
    n_segments = int(segments.max()) + 1
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 2, (num_samples, n_segments), dtype=np.uint8)
    data[0, :] = 1  # the first sample is the unperturbed image
    scores = np.empty((num_samples, len(class_names)), dtype=np.float64)

    def score(start: int) -> None:
        rows = data[start : start + PREDICT_BATCH]
        keep = rows[:, segments].astype(bool)  # (batch, 224, 224)
        batch = np.where(keep, pixels[None, :, :], HIDDEN_VALUE).astype(np.uint8)[..., None]
        scores[start : start + len(rows)] = predict(batch)

    starts = range(0, num_samples, PREDICT_BATCH)
    for _ in pool.map(score, starts) if pool is not None else map(score, starts):
        pass
    distances = pairwise_distances(data, data[:1], metric="cosine").ravel()

    def kernel(d: np.ndarray) -> np.ndarray:
        return np.sqrt(np.exp(-(d**2) / KERNEL_WIDTH**2))

    base = lime_base.LimeBase(kernel, random_state=np.random.RandomState(seed))
    target = class_names.index(label)
    _, weights, _, _ = base.explain_instance_with_data(
        data, scores, distances, target, n_segments, feature_selection="highest_weights"
    )
    ranked = sorted(weights, key=lambda item: -item[1])
    chosen = [int(seg) for seg, weight in ranked[:num_features] if weight > 0]
    return np.isin(segments, chosen), chosen


def overlay_png(pixels: np.ndarray, mask: np.ndarray, label: str) -> bytes:
    """The radiograph with supporting regions tinted and outlined, as PNG bytes."""
    base = np.repeat(pixels[:, :, None].astype(np.float64), 3, axis=2)
    tint = TINTS.get(label, TINTS["PNEUMONIA"])
    out = base.copy()
    out[mask] = 0.6 * base[mask] + 0.4 * tint
    edges = find_boundaries(mask, mode="inner")
    out[edges] = BOUNDARY
    buffer = io.BytesIO()
    Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


# The long side of an overlay drawn at the uploaded image's aspect ratio (`shape=source`).
SOURCE_LONG_SIDE = 512


def to_source_shape(png: bytes, width: int, height: int) -> bytes:
    """The 224 x 224 overlay resized to the upload's aspect ratio (the model input stretched
    it to a square: a 1646 x 1341 radiograph's anatomy is narrowed by a fifth), long side
    SOURCE_LONG_SIDE px, bicubic. The regions are the same; only their proportions change."""
    scale = SOURCE_LONG_SIDE / max(width, height, 1)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    with Image.open(io.BytesIO(png)) as overlay:
        resized = overlay.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    resized.save(buffer, format="PNG")
    return buffer.getvalue()
