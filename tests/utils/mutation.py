"""Byte mutation for the hypothesis tests of the decoders: flipped bytes and cut tails."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from app.errors import InputError
from app.imaging import decode_image, decode_small_raster


def mutate(data: st.DataObject, blob: bytes, first: int, min_flips: int) -> bytes:
    """Flip up to 8 bytes at or after `first`, then maybe cut the tail (not before `first`)."""
    out = bytearray(blob)
    for _ in range(data.draw(st.integers(min_flips, 8))):
        out[data.draw(st.integers(first, len(out) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        out = out[: data.draw(st.integers(first, len(out)))]
    return bytes(out)


def assert_decodes_or_refuses(blob: bytes) -> None:
    """Either the model input comes out, or the one domain error; nothing else escapes. The
    event-loop fast path for small uploads declines (None) or agrees with the full decode."""
    try:
        decoded = decode_image(blob)
    except InputError as exc:
        try:
            fast = decode_small_raster(blob)
        except InputError as fast_exc:
            assert type(fast_exc) is type(exc)
        else:
            assert fast is None
        return
    assert decoded.pixels.shape == (224, 224) and decoded.pixels.dtype == np.uint8
    fast = decode_small_raster(blob)
    assert fast is None or np.array_equal(fast.pixels, decoded.pixels)
