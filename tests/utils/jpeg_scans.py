"""A progressive JPEG of endless scans, for the tests that refuse it."""

from __future__ import annotations

import io
import itertools

from PIL import Image


def progressive_with_repeated_scan(side: int, repeats: int) -> bytes:
    """A side x side progressive JPEG with its smallest scan repeated `repeats` times more:
    libjpeg accepts it and passes over every coefficient block once per scan (218 KB for
    4000 px and 5,000 repeats, which took it 33 s to decode)."""
    out = io.BytesIO()
    Image.new("L", (side, side), 128).save(out, "JPEG", progressive=True, quality=50)
    data = out.getvalue()
    end = data.rindex(b"\xff\xd9")
    starts = [i for i in range(len(data) - 1) if data[i : i + 2] == b"\xff\xda"] + [end]
    scans = [data[a:b] for a, b in itertools.pairwise(starts)]
    return data[:end] + min(scans, key=len) * repeats + b"\xff\xd9"
