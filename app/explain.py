"""LIME explanations drawn over the preprocessed radiograph.

lime 0.2.0.1's default segmenter wraps scikit-image's quickshift with an argument newer
scikit-image releases removed, so we pass our own segmentation function (SLIC superpixels:
compact regions that follow lung and rib-cage edges, and ~10x faster than quickshift).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable

import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries, slic

os.environ.setdefault("TQDM_DISABLE", "1")  # lime draws a progress bar on stderr otherwise
N_SEGMENTS = 60
PREDICT_BATCH = 250
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
) -> tuple[np.ndarray, list[int]]:
    """Run LIME; returns (mask of the regions supporting `label`, their segment ids)."""
    from lime import lime_image

    def classifier_fn(images: np.ndarray) -> np.ndarray:
        gray = np.asarray(images[..., 0], dtype=np.uint8)[..., None]
        return predict(gray)

    rgb = np.repeat(pixels[:, :, None], 3, axis=2)
    explainer = lime_image.LimeImageExplainer(random_state=seed)
    explanation = explainer.explain_instance(
        rgb,
        classifier_fn,
        top_labels=2,
        num_samples=num_samples,
        batch_size=PREDICT_BATCH,
        segmentation_fn=segment,
        random_seed=seed,
        hide_color=0,
    )
    target = class_names.index(label)
    weights = sorted(explanation.local_exp[target], key=lambda item: -item[1])
    chosen = [int(seg) for seg, weight in weights[:num_features] if weight > 0]
    mask = np.isin(explanation.segments, chosen)
    return mask, chosen


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
