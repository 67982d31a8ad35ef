"""How the shipped model's call moves when a radiograph is framed differently (session 18).

In this data set the two classes differ in shape and field of view: the full-resolution
originals of NORMAL images have a median of 1646 x 1341 px (aspect 1.21), those of PNEUMONIA
1176 x 768 (aspect 1.51). A model can learn such a cue, and it would not carry over to a site
whose detectors and collimation are the same for both classes. This probe re-frames the 200
originals in `../shared/data/originals/train` through the service's own decode path and counts
the calls at the stored threshold:
- each class framed to the other's median aspect (a centred crop: top and bottom off a NORMAL
  image, the sides off a PNEUMONIA one);
- a control: 10 % off every side, each image's own aspect kept (a tighter field of view).
The originals are copies of training-split images, so the model has seen most of them
unframed: this measures sensitivity to framing, not accuracy.

    .venv/bin/python docs/experiments/framing_probe.py > docs/experiments/framing_probe.txt
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.classifier import load_version  # noqa: E402
from app.imaging import decode_image  # noqa: E402

VERSION = 6
ORIGINALS = ROOT.parent / "shared" / "data" / "originals" / "train"


def score(model, image: Image.Image) -> float:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    pixels = decode_image(buffer.getvalue()).pixels
    return float(model.predict(pixels[None, ..., None])[0][1])


def to_aspect(image: Image.Image, target: float) -> Image.Image:
    width, height = image.size
    if width / height < target:  # too tall: top and bottom off
        new_height = round(width / target)
        top = (height - new_height) // 2
        return image.crop((0, top, width, top + new_height))
    new_width = round(height * target)  # too wide: the sides off
    left = (width - new_width) // 2
    return image.crop((left, 0, left + new_width, height))


def tighter(image: Image.Image, fraction: float = 0.10) -> Image.Image:
    width, height = image.size
    dx, dy = int(width * fraction), int(height * fraction)
    return image.crop((dx, dy, width - dx, height - dy))


def main() -> None:
    model = load_version(ROOT / "model_store" / "pneumonia", VERSION)
    card = json.loads(
        (ROOT / "model_store" / "pneumonia" / str(VERSION) / "model.json").read_text()
    )
    threshold = card["threshold"]
    print(f"model v{VERSION}, threshold {threshold:.4f}; share called PNEUMONIA, before -> after")
    cases = {
        "NORMAL": (("framed to aspect 1.51 (PNEUMONIA's median)", lambda i: to_aspect(i, 1.51)),),
        "PNEUMONIA": (("framed to aspect 1.21 (NORMAL's median)", lambda i: to_aspect(i, 1.21)),),
    }
    for name in ("NORMAL", "PNEUMONIA"):
        images = [Image.open(f).convert("L") for f in sorted((ORIGINALS / name).glob("*.jpeg"))]
        base = np.array([score(model, image) for image in images])
        changes = (*cases[name], ("10 % off every side, aspect kept", tighter))
        for label, change in changes:
            moved = np.array([score(model, change(image)) for image in images])
            print(
                f"{name} (n={len(images)}) {label}: {np.mean(base >= threshold):.2f} -> "
                f"{np.mean(moved >= threshold):.2f}; median P(pneumonia) {np.median(base):.3f} "
                f"-> {np.median(moved):.3f}; mean |change| {np.mean(np.abs(moved - base)):.3f}"
            )


if __name__ == "__main__":
    main()
