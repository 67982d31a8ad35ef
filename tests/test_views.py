"""Test-time views (training/views.py): shapes, the black frame of a zoom-out, the crop of a
zoom-in, and agreement with Pillow's bilinear resize that made the 224 px copies."""

from __future__ import annotations

import numpy as np
from PIL import Image

from training.views import VIEW_SETS, identity, zoom_in, zoom_out


def gradient_batch() -> np.ndarray:
    row = np.linspace(20, 235, 224)
    image = (row[None, :] * 0.5 + row[:, None] * 0.5).astype(np.uint8)
    return np.stack([image, 255 - image])[..., None]


def test_views_keep_shape_and_dtype() -> None:
    images = gradient_batch()
    for views in VIEW_SETS.values():
        for view in views:
            out = np.asarray(view(images))
            assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(identity(images)), images)


def test_zoom_out_centres_a_shrunk_image_on_black() -> None:
    images = gradient_batch()
    out = np.asarray(zoom_out(images, 0.08))
    inner = round(224 * 0.92)  # 206: a 9 px frame each side
    before = (224 - inner) // 2
    assert (out[:, :before] == 0).all() and (out[:, :, :before] == 0).all()
    assert (out[:, before + inner :] == 0).all() and (out[:, :, before + inner :] == 0).all()
    inside = out[0, before : before + inner, before : before + inner, 0]
    pillow = np.asarray(
        Image.fromarray(images[0, :, :, 0]).resize((inner, inner), Image.Resampling.BILINEAR)
    )
    assert np.abs(inside.astype(int) - pillow.astype(int)).max() <= 2


def test_zoom_in_is_the_central_crop_resized_up() -> None:
    images = gradient_batch()
    out = np.asarray(zoom_in(images, 0.08))
    inner = round(224 * 0.92)
    start = (224 - inner) // 2
    crop = Image.fromarray(images[0, start : start + inner, start : start + inner, 0])
    pillow = np.asarray(crop.resize((224, 224), Image.Resampling.BILINEAR))
    assert np.abs(out[0, :, :, 0].astype(int) - pillow.astype(int)).max() <= 2
    # the corners now hold values from inside the original frame, not its edge
    assert out[0, 0, 0, 0] > images[0, 0, 0, 0]
