"""Decode + preprocess cost per input kind, and proof that the reduced-scale JPEG decode of the
full-resolution originals gives the same answers as their 224 x 224 training copies.

    python -m benchmarks.preprocess
"""

from __future__ import annotations

import io
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
from PIL import Image

from app.classifier import load_version
from app.imaging import decode_image, resize_to_model, to_grayscale_u8
from app.model_store import list_versions
from benchmarks.common import SHARED, default_store, percentiles, report
from tests.utils.dicom_factory import make_dicom


def time_decode(data: bytes, repeats: int = 30) -> dict[str, float]:
    decode_image(data)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        decode_image(data)
        times.append((time.perf_counter() - t) * 1000)
    return percentiles(times, (50, 95))


def median_original() -> tuple[str, bytes]:
    folder = SHARED / "originals" / "train" / "NORMAL"
    files = sorted(folder.iterdir(), key=lambda p: Image.open(p).size[0] * Image.open(p).size[1])
    chosen = files[len(files) // 2]
    return chosen.name, chosen.read_bytes()


def run() -> dict:
    name, original = median_original()
    full = Image.open(io.BytesIO(original))
    copy_224 = (SHARED / "chest_xray" / "train" / "NORMAL" / name).read_bytes()
    gray = to_grayscale_u8(full)
    png = io.BytesIO()
    gray.save(png, format="PNG")
    dicom = make_dicom(np.asarray(gray), bits=12, voi_lut=True)
    costs = {
        "jpeg_224": time_decode(copy_224),
        f"jpeg_full_{full.size[0]}x{full.size[1]}": time_decode(original),
        "jpeg_full_no_draft": None,
        f"png_full_{full.size[0]}x{full.size[1]}": time_decode(png.getvalue(), 10),
        f"dicom_12bit_voi_{full.size[0]}x{full.size[1]}": time_decode(dicom, 10),
    }
    times = []
    for _ in range(10):
        t = time.perf_counter()
        resize_to_model(to_grayscale_u8(Image.open(io.BytesIO(original))))
        times.append((time.perf_counter() - t) * 1000)
    costs["jpeg_full_no_draft"] = percentiles(times, (50, 95))

    model_dir = default_store() / "pneumonia"
    model = load_version(model_dir, max(list_versions(model_dir)))
    diffs, pixel_mad = [], []
    for label in ("NORMAL", "PNEUMONIA"):
        for path in sorted((SHARED / "originals" / "train" / label).iterdir()):
            served = decode_image(path.read_bytes()).pixels
            copy = np.asarray(
                Image.open(SHARED / "chest_xray" / "train" / label / path.name).convert("L")
            )
            probs = model.predict(np.stack([served, copy])[..., None])[:, 1]
            diffs.append(abs(float(probs[0] - probs[1])))
            pixel_mad.append(float(np.abs(served.astype(int) - copy.astype(int)).mean()))
    parity = {
        "n": len(diffs),
        "max_abs_prob_diff": round(max(diffs), 4),
        "mean_abs_prob_diff": round(float(np.mean(diffs)), 4),
        "mean_pixel_mad": round(float(np.mean(pixel_mad)), 2),
    }
    rows = [(f"decode {k} p50/p95 (ms)", f"{v['p50']} / {v['p95']}") for k, v in costs.items()]
    rows += [
        ("originals vs 224 copies: images", parity["n"]),
        ("  max |P(pneumonia) diff|", parity["max_abs_prob_diff"]),
        ("  mean |P(pneumonia) diff|", parity["mean_abs_prob_diff"]),
        ("  mean pixel abs diff (grey levels)", parity["mean_pixel_mad"]),
    ]
    result = {"decode_ms": costs, "parity": parity, "model_version": model.version}
    report("decode + preprocess", rows, result)
    return result


if __name__ == "__main__":
    run()
