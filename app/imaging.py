"""The one preprocessing implementation, shared by the service and `training/`.

Input contract of every model in the store: one 8-bit grayscale channel, 224 x 224, made by a
plain stretch resize (aspect ratio not kept) with Pillow's bilinear filter -- the way the
shared 224 x 224 training copies were made. Any pixel scaling lives inside the exported model.

Accepted containers: JPEG, PNG and DICOM Part 10 (see `app.dicom`). The format is sniffed
from the bytes, never taken from a file name or a content type.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, PngImagePlugin

from app.errors import (
    BlankImageError,
    ImageTooLargeError,
    ImageTooSmallError,
    InputError,
    UndecodableImageError,
    UnsupportedImageError,
    UnsupportedMediaError,
)
from app.population import PatientAge

TARGET_SIZE = 224
# Decode large JPEGs at a reduced scale (libjpeg DCT scaling) but never below twice the
# target, so the bilinear downscale that follows sees the same detail (parity is tested).
DRAFT_MIN_SIDE = 2 * TARGET_SIZE
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MIN_SIDE = 64
# A model input whose grey levels spread less than this (standard deviation, 0..255) holds no
# picture: a black or white frame, a failed exposure. The 5,232 radiographs of the shared train
# and val splits have 19.8 at least (median 57). It is measured on every 4th row and column
# (56 x 56 pixels, within 1.5 of the full image's on those radiographs): a quarter of the
# event-loop time of the full image's (~40 vs ~150 us).
MIN_CONTENT_STD = 4.0
CONTENT_STRIDE = 4

ImageFile.LOAD_TRUNCATED_IMAGES = False
# How Pillow's ValueError for a PNG text or ICC profile chunk that decompresses beyond
# PngImagePlugin.MAX_TEXT_CHUNK begins (its wording has changed between releases).
PNG_TEXT_BOMB = "decompressed data too large"


@dataclass(frozen=True)
class DecodedImage:
    """A radiograph reduced to the model's input contract plus facts about the original."""

    pixels: np.ndarray  # uint8, shape (224, 224)
    format: str  # "JPEG" | "PNG" | "DICOM"
    width: int
    height: int
    dicom: dict[str, str] = field(default_factory=dict)
    # The parsed DICOM dataset, kept only to build an SR in the same study; never logged.
    source: object | None = field(default=None, repr=False, compare=False)
    # The patient's age from a DICOM (app.population), checked against the trained ages; never
    # logged or returned, only its verdict.
    patient_age: PatientAge | None = field(default=None, repr=False, compare=False)


def sniff_format(data: bytes) -> str:
    """Name the container from its magic bytes."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "DICOM"
    raise UnsupportedMediaError(
        "Unsupported file type: send a JPEG, a PNG or a DICOM Part 10 file "
        "(with the 128-byte preamble and 'DICM' prefix)."
    )


# A JPEG's header segments and a PNG's chunks are walked one by one in Python, by Pillow as
# by `jpeg_frame`: a 4 MB JPEG of a million empty APP5 segments kept Pillow busy for 1.5 s, so
# the 64 MB an upload may be would hold a decode thread for ~24 s (a PNG of empty chunks: ~10 s).
# Real files have a few dozen segments before the image data (an ICC profile split over 64 KB
# APP2 segments: a few hundred) and PNG encoders write IDAT chunks of 8 KB or more, so beyond
# these counts the file is refused before Pillow parses it.
MAX_JPEG_HEADER_SEGMENTS = 1000
PNG_CHUNKS_FREE = 1000
PNG_BYTES_PER_CHUNK = 1024  # one more chunk allowed per this many bytes of file
JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # + JPEG-LS
JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(columns, rows, components) from a JPEG's (or JPEG-LS's) Start Of Frame segment, walking
    the segments up to the first scan; None without one. UndecodableImageError beyond
    MAX_JPEG_HEADER_SEGMENTS segments, or MAX_JPEG_SCANS scans."""
    offset, segments, frame = 2, 0, None
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker == 0xFF:  # a fill byte before the marker
            offset += 1
            continue
        segments += 1
        if segments > MAX_JPEG_HEADER_SEGMENTS:
            raise UndecodableImageError(
                f"The JPEG has more than {MAX_JPEG_HEADER_SEGMENTS} header segments before its "
                "image data (real files have a few dozen): it is refused unparsed."
            )
        if marker in JPEG_STANDALONE_MARKERS:
            offset += 2
            continue
        if marker == 0xDA:  # the first scan: the image data begins
            check_jpeg_scans(data, offset)
            return frame
        if marker == 0xD9:  # end of image
            return frame
        if marker in JPEG_SOF_MARKERS and frame is None:
            if offset + 10 > len(data):
                return None
            rows, columns, components = struct.unpack_from(">HHB", data, offset + 5)
            frame = columns, rows, components
        (length,) = struct.unpack_from(">H", data, offset + 2)
        offset += 2 + length
    return frame


# Each scan of a progressive JPEG passes over every coefficient block of the image, and libjpeg
# accepts a scan repeated any number of times: a 218 KB progressive JPEG of 4000 x 4000 pixels
# with one 31-byte scan repeated 5,000 times took 33 s to decode (draft mode does not help).
# Encoders write up to ten or so (libjpeg's default progression: 10 for colour, 6 for grey).
MAX_JPEG_SCANS = 100


def check_jpeg_scans(data: bytes, first_scan: int) -> None:
    """UndecodableImageError for a JPEG of more than MAX_JPEG_SCANS scans. Counted from the
    first scan on, where a 0xFF data byte is always stuffed (0xFF00), so every 0xFFDA is a
    Start Of Scan marker; in C, ~20 ms for 64 MB."""
    scans = data.count(b"\xff\xda", first_scan)
    if scans > MAX_JPEG_SCANS:
        raise UndecodableImageError(
            f"The JPEG has {scans} scans (at most {MAX_JPEG_SCANS} are decoded; encoders write "
            "about ten): re-encode it, or send it as a baseline JPEG or a PNG."
        )


def check_png_chunks(data: bytes) -> None:
    """UndecodableImageError for a PNG of more chunks than PNG_CHUNKS_FREE plus one per
    PNG_BYTES_PER_CHUNK bytes (walked by their length fields, to IEND)."""
    budget = PNG_CHUNKS_FREE + len(data) // PNG_BYTES_PER_CHUNK
    offset, chunks = 8, 0
    while offset + 8 <= len(data):
        chunks += 1
        if chunks > budget:
            raise UndecodableImageError(
                f"The PNG has more than {budget} chunks for its {len(data)} bytes (encoders "
                "write a few dozen, or one per 8 KB or more of image data): it is refused "
                "unparsed."
            )
        if data[offset + 4 : offset + 8] == b"IEND":
            return
        (length,) = struct.unpack_from(">I", data, offset)
        offset += 12 + length


def check_dimensions(width: int, height: int, max_pixels: int, min_side: int) -> None:
    """Refuse decompression bombs and thumbnails before any pixel is decoded."""
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"Image is {width} x {height} = {width * height} pixels; the limit is {max_pixels}."
        )
    if min(width, height) < min_side:
        raise ImageTooSmallError(
            f"Image is {width} x {height}; a radiograph needs at least {min_side} px per side."
        )


# Conversions run in strips of this many rows: a whole-image one of a 7000 x 7000 PNG made
# float64 or RGBA copies of all of it, 1.2 GB for a 112 KB 16-bit file and 750 MB for an RGBA
# one. Every step is per pixel, so strips give the same bytes (tested).
STRIP_ROWS = 256


def to_grayscale_u8(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to one 8-bit channel ('L')."""
    mode = image.mode
    if mode == "L":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image)
        scaled = np.empty(array.shape, np.uint8)
        for top in range(0, array.shape[0], STRIP_ROWS):
            strip = array[top : top + STRIP_ROWS].astype(np.float64)
            # 16-bit PNGs use the full 0..65535 range: scale linearly to 0..255.
            scaled[top : top + STRIP_ROWS] = np.clip(np.rint(strip / 257.0), 0, 255)
        return Image.fromarray(scaled, mode="L")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        return in_strips(image, flatten_alpha)
    if mode == "CMYK":
        return in_strips(image, lambda strip: strip.convert("RGB").convert("L"))
    return image.convert("L")


def flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite onto black, as a viewer with a black background shows it, then grey."""
    image = image.convert("RGBA")
    background = Image.new("RGBA", image.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, image).convert("L")


def in_strips(image: Image.Image, convert) -> Image.Image:
    """`convert` (a per-pixel conversion to 'L') applied to STRIP_ROWS rows at a time."""
    width, height = image.size
    out = Image.new("L", image.size)
    for top in range(0, height, STRIP_ROWS):
        out.paste(convert(image.crop((0, top, width, min(height, top + STRIP_ROWS)))), (0, top))
    return out


# EXIF Orientation -> the transposition that shows the image as every viewer displays it
# (Pillow's `ImageOps.exif_transpose` table). A JPEG exported by a phone or a viewer may store
# its pixels sideways with this tag; the model must see the radiograph upright.
EXIF_ORIENTATION = 0x0112
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright(gray: Image.Image, source: Image.Image) -> Image.Image:
    """`gray` turned as `source`'s EXIF Orientation tag says (unchanged without one)."""
    if "exif" not in source.info:
        return gray
    orientation = source.getexif().get(EXIF_ORIENTATION, 1)
    method = ORIENTATION_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return gray.transpose(method) if method is not None else gray


def resize_to_model(image: Image.Image) -> np.ndarray:
    """Stretch-resize an 8-bit grayscale image to the model input, as the training copies were."""
    if image.mode != "L":
        raise ValueError(f"expected mode 'L', got {image.mode!r}")
    if image.size != (TARGET_SIZE, TARGET_SIZE):
        image = image.resize((TARGET_SIZE, TARGET_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).copy()


def check_content(pixels: np.ndarray) -> None:
    """Refuse a model input that is blank: the model would still answer NORMAL or PNEUMONIA."""
    spread = float(pixels[::CONTENT_STRIDE, ::CONTENT_STRIDE].std())
    if spread < MIN_CONTENT_STD:
        raise BlankImageError(
            f"The image is blank (grey-level standard deviation {spread:.1f} of 255 at "
            "224 x 224): send the radiograph itself, not an empty or failed frame."
        )


def decode_raster(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
) -> DecodedImage:
    """Decode a JPEG or PNG to the model input."""
    fmt = sniff_format(data)
    if fmt == "DICOM":
        raise UnsupportedMediaError("DICOM must go through app.dicom.decode_dicom.")
    decoded = _decode_raster(data, fmt, max_pixels, min_side, only_if_small=False)
    assert decoded is not None
    return decoded


# Uploads this small decode in well under a millisecond (a 224 px JPEG: ~0.3 ms), cheaper than
# handing them to a decode thread and back; anything larger goes to the decode pool.
INLINE_MAX_BYTES = 256 * 1024
INLINE_MAX_PIXELS = 640 * 640


def decode_small_raster(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
) -> DecodedImage | None:
    """The model input for a baseline JPEG or a PNG whose header promises a small decode (the
    caller may run it on the event loop); None for anything else, which then goes through
    `decode_image` on the decode pool, where every problem is named. Progressive JPEGs return
    None: each scan passes over the whole image, so even within MAX_JPEG_SCANS one can take
    tens of milliseconds at this size."""
    try:
        fmt = sniff_format(data)
    except UnsupportedMediaError:
        return None
    if fmt == "DICOM" or len(data) > INLINE_MAX_BYTES:
        return None
    with domain_errors(fmt):
        return _decode_raster(data, fmt, max_pixels, min_side, only_if_small=True)


def _decode_raster(
    data: bytes, fmt: str, max_pixels: int, min_side: int, *, only_if_small: bool
) -> DecodedImage | None:
    """Open the header once; with `only_if_small`, stop (None) unless the decode is small."""
    if fmt == "JPEG":
        jpeg_frame(data)
    else:
        check_png_chunks(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Corrupt EXIF makes Pillow warn once per bad tag: a hostile upload must not fill
            # the log with them (the tag is then read as absent).
            warnings.simplefilter("ignore", UserWarning)
            try:
                image = Image.open(io.BytesIO(data), formats=[fmt])
            except Exception:
                if only_if_small:
                    return None  # not ours to judge here: the full decode reports it
                raise
            width, height = image.size
            # A Multi-Picture JPEG (CIPA DC-007, "MPO": many cameras and phones write one) holds
            # its primary image first and previews after it; a viewer shows the first, as here.
            frames = 1 if image.format == "MPO" else getattr(image, "n_frames", 1)
            if only_if_small and (
                width * height > INLINE_MAX_PIXELS or image.info.get("progressive") or frames > 1
            ):
                return None
            check_dimensions(width, height, max_pixels, min_side)
            if frames > 1:
                raise UnsupportedMediaError("Animated or multi-frame images are not accepted.")
            if image.mode == "1":  # as 1-bit DICOM pixel data is refused (app.dicom)
                raise UnsupportedImageError(
                    "The image is 1-bit (black and white only: a thresholded image or a scanned "
                    "form), not a radiograph: send the grey-scale image."
                )
            if fmt == "JPEG":
                draft_mode = "L" if image.mode in ("L", "RGB", "YCbCr") else None
                image.draft(draft_mode, (DRAFT_MIN_SIDE, DRAFT_MIN_SIDE))
            image.load()
            gray = to_grayscale_u8(image)
            turned = upright(gray, image)
            if turned.size != gray.size:  # a quarter turn: report the size as displayed
                width, height = height, width
            gray = turned
    except (ImageTooLargeError, ImageTooSmallError, UnsupportedMediaError, UnsupportedImageError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"Image refused as a decompression bomb: {exc}") from exc
    except ValueError as exc:
        if not str(exc).lower().startswith(PNG_TEXT_BOMB):
            raise UndecodableImageError(
                f"The {fmt} file could not be decoded (truncated or corrupt): ValueError."
            ) from exc
        raise ImageTooLargeError(
            "Image refused as a decompression bomb: a compressed metadata chunk (zTXt, iTXt "
            f"or iCCP) expands beyond {PngImagePlugin.MAX_TEXT_CHUNK // 1024 // 1024} MB. "
            "Send the radiograph without it."
        ) from exc
    except (OSError, SyntaxError, EOFError, IndexError, TypeError, KeyError) as exc:
        raise UndecodableImageError(
            f"The {fmt} file could not be decoded (truncated or corrupt): {type(exc).__name__}."
        ) from exc
    return DecodedImage(pixels=resize_to_model(gray), format=fmt, width=width, height=height)


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
) -> DecodedImage:
    """Decode any accepted upload (JPEG, PNG, DICOM) to the model input."""
    if not data:
        raise UndecodableImageError("The uploaded file is empty.")
    fmt = sniff_format(data)
    with domain_errors(fmt):
        if fmt == "DICOM":
            from app.dicom import decode_dicom  # pydicom is only imported when DICOM arrives

            return decode_dicom(data, max_pixels=max_pixels, min_side=min_side)
        return decode_raster(data, max_pixels=max_pixels, min_side=min_side)


@contextlib.contextmanager
def domain_errors(fmt: str) -> Iterator[None]:
    """Whatever a decoder raises on hostile bytes (pydicom's lazy element parsing, pyo3's
    PanicException from the Rust decoders, which is a BaseException, zlib errors) becomes the
    caller's bad file, reported as the one domain error type."""
    try:
        yield
    except InputError:
        raise
    except MemoryError as exc:
        raise ImageTooLargeError(f"The {fmt} file needs too much memory to decode.") from exc
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        raise UndecodableImageError(
            f"The {fmt} file could not be decoded (truncated or corrupt): {type(exc).__name__}."
        ) from exc


def load_path(path: str) -> np.ndarray:
    """Read a file from disk through the same path the service uses (training entry point)."""
    with open(path, "rb") as handle:
        return decode_image(handle.read()).pixels
