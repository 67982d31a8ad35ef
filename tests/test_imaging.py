"""The one preprocessing implementation: parity with the training copies, formats, limits."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.errors import (
    ImageTooLargeError,
    ImageTooSmallError,
    UndecodableImageError,
    UnsupportedMediaError,
)
from app.imaging import (
    EXIF_ORIENTATION,
    ORIENTATION_TRANSPOSE,
    decode_image,
    decode_small_raster,
    resize_to_model,
    to_grayscale_u8,
)
from tests.conftest import FIXTURES, fixture_bytes
from tests.utils.jpeg_scans import progressive_with_repeated_scan
from tests.utils.mutation import assert_decodes_or_refuses, mutate

PAIRS = [
    ("NORMAL2-IM-0744-0001.jpeg", "NORMAL"),
    ("NORMAL2-IM-0746-0001.jpeg", "NORMAL"),
    ("person495_bacteria_2094.jpeg", "PNEUMONIA"),
    ("person1133_virus_1865.jpeg", "PNEUMONIA"),
]


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(("name", "label"), PAIRS)
def test_original_matches_training_copy(name: str, label: str) -> None:
    """Serving a full-resolution original gives the pixels training saw (JPEG noise aside)."""
    served = decode_image(fixture_bytes(f"originals/{name}")).pixels
    copy = np.asarray(Image.open(FIXTURES / "chest_xray" / label / name).convert("L"))
    assert served.shape == (224, 224) and served.dtype == np.uint8
    assert np.abs(served.astype(int) - copy.astype(int)).mean() < 3.0


@pytest.mark.parametrize(("name", "label"), PAIRS)
def test_reduced_scale_decode_matches_full_decode(name: str, label: str) -> None:
    data = fixture_bytes(f"originals/{name}")
    full = resize_to_model(to_grayscale_u8(Image.open(io.BytesIO(data))))
    fast = decode_image(data).pixels
    assert np.abs(full.astype(int) - fast.astype(int)).mean() < 1.5


def test_training_copy_passes_through_unchanged() -> None:
    path = FIXTURES / "chest_xray" / "NORMAL" / "NORMAL2-IM-0744-0001.jpeg"
    decoded = decode_image(path.read_bytes())
    assert np.array_equal(decoded.pixels, np.asarray(Image.open(path).convert("L")))
    assert (decoded.format, decoded.width, decoded.height) == ("JPEG", 224, 224)


@pytest.fixture
def gray() -> Image.Image:
    return Image.open(FIXTURES / "chest_xray" / "NORMAL" / "NORMAL2-IM-0744-0001.jpeg").convert("L")


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P"])
def test_png_modes_decode_to_the_same_gray(gray: Image.Image, mode: str) -> None:
    reference = np.asarray(gray)
    decoded = decode_image(encode(gray.convert(mode), "PNG")).pixels
    assert np.abs(decoded.astype(int) - reference.astype(int)).mean() < 1.5


def test_a_1_bit_png_is_refused_like_1_bit_dicom(gray: Image.Image) -> None:
    """Black and white only (a thresholded radiograph, a scanned form) is not a radiograph;
    it was scored before round 19, and 1-bit DICOM pixel data was already refused."""
    from app.errors import UnsupportedImageError
    from app.imaging import decode_small_raster

    png = encode(gray.convert("1"), "PNG")
    with pytest.raises(UnsupportedImageError, match="1-bit"):
        decode_image(png)
    with pytest.raises(UnsupportedImageError):  # the small-image path on the event loop too
        decode_small_raster(png)


def test_16bit_png_scales_full_range(gray: Image.Image) -> None:
    wide = (np.asarray(gray).astype(np.uint16) * 257).astype(np.uint16)
    png = encode(Image.fromarray(wide), "PNG")
    assert Image.open(io.BytesIO(png)).mode.startswith("I")
    assert np.array_equal(decode_image(png).pixels, np.asarray(gray))


def test_cmyk_jpeg_decodes(gray: Image.Image) -> None:
    data = encode(gray.convert("RGB").convert("CMYK"), "JPEG", quality=95)
    decoded = decode_image(data)
    assert decoded.pixels.shape == (224, 224)
    assert abs(float(decoded.pixels.mean()) - float(np.asarray(gray).mean())) < 25


def test_truncated_jpeg_is_undecodable(normal_jpeg: bytes) -> None:
    with pytest.raises(UndecodableImageError):
        decode_image(normal_jpeg[: len(normal_jpeg) // 2])


def test_truncated_png_is_undecodable(gray: Image.Image) -> None:
    data = encode(gray, "PNG")
    with pytest.raises(UndecodableImageError):
        decode_image(data[: len(data) // 2])


def test_png_bomb_refused_before_decoding() -> None:
    bomb = encode(Image.new("L", (30_000, 30_000)), "PNG", optimize=True)
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageTooLargeError):
        decode_image(bomb)


def test_jpeg_header_bomb_refused() -> None:
    data = bytearray(encode(Image.new("L", (100, 100)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big")
    with pytest.raises(ImageTooLargeError):
        decode_image(bytes(data))


def test_tiny_image_refused() -> None:
    with pytest.raises(ImageTooSmallError):
        decode_image(encode(Image.new("L", (32, 32)), "PNG"))


@pytest.mark.parametrize(
    "payload",
    [
        b"%PDF-1.4\n%...",
        b"<html><body>x</body></html>",
        b"PK\x03\x04zipzip",
        b"hello",
        b"GIF89a\x01\x00\x01\x00",
        b"II*\x00tiff",
    ],
)
def test_non_images_are_unsupported(payload: bytes) -> None:
    with pytest.raises(UnsupportedMediaError):
        decode_image(payload)


def test_empty_is_undecodable() -> None:
    with pytest.raises(UndecodableImageError):
        decode_image(b"")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_real_images_decode_or_raise_the_domain_error(data: st.DataObject) -> None:
    """Flipped bytes, cut tails and spliced junk: decoded, or InputError; nothing else."""
    source = data.draw(
        st.sampled_from(
            [
                "chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg",
                "chest_xray/PNEUMONIA/person495_bacteria_2094.jpeg",
            ]
        )
    )
    blob = fixture_bytes(source)
    if data.draw(st.booleans()):
        blob = encode(Image.open(io.BytesIO(blob)), "PNG")
    assert_decodes_or_refuses(mutate(data, blob, first=0, min_flips=0))


def test_small_raster_fast_path_is_chosen_from_the_header_only() -> None:
    """224 px uploads decode inline; full-resolution, DICOM, bombs and junk go to the pool."""
    small = next((FIXTURES / "chest_xray" / "NORMAL").iterdir()).read_bytes()
    png = encode(Image.new("L", (300, 300), 128), "PNG")
    for data in (small, png):
        inline = decode_small_raster(data)
        assert inline is not None
        reference = decode_image(data)
        assert np.array_equal(inline.pixels, reference.pixels)
        assert (inline.format, inline.width, inline.height) == (
            reference.format,
            reference.width,
            reference.height,
        )
    assert decode_small_raster(fixture_bytes("originals/NORMAL2-IM-0744-0001.jpeg")) is None
    assert decode_small_raster(fixture_bytes("dicom/person1946_bacteria_4874.dcm")) is None
    # A few hundred bytes of PNG that would inflate to 20 000 x 20 000 pixels.
    bomb = encode(Image.new("1", (20_000, 20_000)), "PNG", optimize=True)
    assert len(bomb) < 256 * 1024
    assert decode_small_raster(bomb) is None
    assert decode_small_raster(small[:40]) is None
    gray = Image.new("L", (224, 224), 90)
    assert decode_small_raster(encode(gray, "JPEG", progressive=True)) is None
    assert decode_small_raster(b"GIF89a" + bytes(100)) is None
    assert decode_small_raster(b"") is None
    # Small but refused: the same domain errors as the full decode.
    with pytest.raises(ImageTooSmallError):
        decode_small_raster(encode(Image.new("L", (20, 20), 90), "PNG"))


INVERSE = {
    Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270,
    Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90,
}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(orientation: int, fmt: str) -> None:
    """Pixels stored sideways with an EXIF Orientation tag reach the model upright, as every
    viewer shows them, and the reported size is the displayed one."""
    upright_image = Image.open(FIXTURES / "originals" / PAIRS[0][0]).convert("L").resize((600, 500))
    method = ORIENTATION_TRANSPOSE.get(orientation)
    stored = (
        upright_image if method is None else upright_image.transpose(INVERSE.get(method, method))
    )
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    decoded = decode_image(encode(stored, fmt, exif=exif, **kwargs))
    reference = decode_image(encode(upright_image, fmt, **kwargs)).pixels
    diff = np.abs(decoded.pixels.astype(int) - reference.astype(int))
    assert diff.mean() < (1.0 if fmt == "JPEG" else 0.5) and diff.max() <= (
        40 if fmt == "JPEG" else 2
    )
    assert (decoded.width, decoded.height) == (600, 500)


@pytest.mark.parametrize("value", [0, 9, 65535])
def test_unknown_exif_orientation_is_ignored(gray: Image.Image, value: int) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = value
    decoded = decode_image(encode(gray, "PNG", exif=exif))
    assert np.array_equal(decoded.pixels, np.asarray(gray))


def test_corrupt_exif_is_read_as_absent_without_warnings(gray: Image.Image) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    exif[0x010F] = "maker"
    data = bytearray(encode(gray, "JPEG", quality=95, exif=exif))
    start = data.find(b"Exif")
    data[start + 14 : start + 30] = b"\xff" * 16  # the IFD's entry count and first tag
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoded = decode_image(bytes(data))
    assert caught == []
    assert decoded.pixels.shape == (224, 224)


def _radiograph_jpeg_and_png() -> tuple[bytes, bytes]:
    image = Image.open(io.BytesIO(fixture_bytes("originals/person495_bacteria_2094.jpeg")))
    gray = image.convert("L")
    jpeg, png = io.BytesIO(), io.BytesIO()
    gray.save(jpeg, "JPEG")
    gray.save(png, "PNG")
    return jpeg.getvalue(), png.getvalue()


def test_a_jpeg_of_endless_header_segments_is_refused_before_pillow_walks_them() -> None:
    """Pillow walks a JPEG's header segments in Python: a million empty ones (4 MB) took it
    1.5 s, so a 64 MB upload would hold a decode thread for ~24 s."""
    import time

    from app.imaging import MAX_JPEG_HEADER_SEGMENTS

    jpeg, _ = _radiograph_jpeg_and_png()
    empty = b"\xff\xe5\x00\x02"  # an APP5 segment with no payload
    many = MAX_JPEG_HEADER_SEGMENTS - 10  # the file's own few segments count too
    assert decode_image(jpeg[:2] + empty * many + jpeg[2:]).format == "JPEG"
    began = time.perf_counter()
    with pytest.raises(UndecodableImageError, match="header segments"):
        decode_image(jpeg[:2] + empty * 1_000_000 + jpeg[2:])
    assert time.perf_counter() - began < 0.5


def test_a_png_of_endless_chunks_is_refused_but_fine_grained_image_data_is_not() -> None:
    import struct
    import time
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    _, png = _radiograph_jpeg_and_png()
    head = 8 + 25  # signature and IHDR
    began = time.perf_counter()
    with pytest.raises(UndecodableImageError, match="chunks"):
        decode_image(png[:head] + chunk(b"abCd", b"") * 1_000_000 + png[head:])
    assert time.perf_counter() - began < 0.5
    # the same pixels in IDAT chunks of 8 KB (libpng's default), as many as a large file has
    image = Image.open(io.BytesIO(png))
    rows = np.asarray(image).astype(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    packed = zlib.compress(raw)
    idats = b"".join(chunk(b"IDAT", packed[i : i + 8192]) for i in range(0, len(packed), 8192))
    split = png[:head] + idats + chunk(b"IEND", b"")
    assert np.array_equal(decode_image(split).pixels, decode_image(png).pixels)


def test_a_progressive_jpeg_of_endless_scans_is_refused_before_it_is_decoded() -> None:
    """218 KB, 4000 x 4000 px, one 31-byte scan repeated 5,000 times: 33 s to decode before."""
    import time

    from app.imaging import MAX_JPEG_SCANS

    bomb = progressive_with_repeated_scan(4000, 5000)
    assert len(bomb) < 256 * 1024
    began = time.perf_counter()
    with pytest.raises(UndecodableImageError, match="5006 scans"):
        decode_image(bomb)
    assert time.perf_counter() - began < 0.5
    within = progressive_with_repeated_scan(400, MAX_JPEG_SCANS - 6)
    assert decode_image(within).format == "JPEG"


def _whole_image_grey(image: Image.Image) -> np.ndarray:
    """to_grayscale_u8 as it was before round 24, on the whole image at once."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        return np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    if mode == "CMYK":
        image = image.convert("RGB")
    return np.asarray(image.convert("L"))


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "RGBA", "LA", "PA", "P+transparency", "CMYK"])
def test_conversions_in_strips_give_the_whole_image_s_bytes(monkeypatch, mode: str) -> None:
    """Strips bound the memory (a 112 KB 16-bit PNG of 7000 x 7000 took 1.2 GB converted
    whole, 280 MB in strips); each step is per pixel, so the bytes are the same."""
    import app.imaging

    monkeypatch.setattr(app.imaging, "STRIP_ROWS", 7)  # several strips and a ragged last one
    rng = np.random.default_rng(5)
    if mode in ("I;16", "I", "F"):
        values = rng.integers(0, 65536, (45, 31))
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        image = Image.fromarray(values.astype(dtype), mode if mode != "I;16" else None)
    else:
        rgba = Image.fromarray(rng.integers(0, 256, (45, 31, 4)).astype(np.uint8), "RGBA")
        if mode == "P+transparency":
            image = rgba.convert("RGB").convert("P")
            image.info["transparency"] = 3
        elif mode == "PA":
            image = rgba.convert("PA")
        else:
            image = rgba.convert(mode)
    assert np.array_equal(np.asarray(to_grayscale_u8(image)), _whole_image_grey(image))
