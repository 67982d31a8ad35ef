"""DICOM Part 10 radiographs to the model input, as a PACS sends them.

Pixel pipeline, in the order the standard prescribes: stored values -> Modality LUT (rescale
slope/intercept) -> VOI LUT or window centre/width -> MONOCHROME1 inverted -> 8 bits -> the one
resize in `app.imaging`. Compressed transfer syntaxes decode through the pylibjpeg plugins.
Photometric Interpretation alone decides the polarity: Presentation LUT Shape is not applied
(some CR/DX objects carry a wrong INVERSE or IDENTITY, which archives such as dcm4chee let sites
ignore for the same reason); an image that still arrives inverted tends to be flagged out of
distribution.
Before pydicom or a pixel decoder sees a file, what would make them spend far more than its
size is refused from the bytes (`check_data_set`, `check_frame_header`): a deflated data set
past a bound, more than MAX_DICOM_ELEMENTS elements, a compressed frame whose own header
disagrees with Rows, Columns and Samples per Pixel, and JPEG 2000 or progressive JPEG coding
that would set up millions of code-blocks, thousands of tiles or scans. Each was measured at
gigabytes or tens of seconds from a small upload.
Only UIDs leave this module; patient tags are never read into logs or responses (the patient's
age is read for `app.population`, which passes on only whether it is within the trained ages).
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from app.errors import ImageTooLargeError, UndecodableImageError, UnsupportedDicomError
from app.imaging import DecodedImage, check_dimensions, jpeg_frame, resize_to_model
from app.population import patient_age

ACCEPTED_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422"}
UID_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
# Modalities (PS3.3 C.7.3.1.1.1) whose images are never a projection chest radiograph: slices,
# ultrasound, mammography, angiography and fluoroscopy, dental, eye, endoscopy, pathology. The
# model would still answer NORMAL or PNEUMONIA for them, so they are refused. CR, DX, DR, and
# OT/SC (a digitised film) or an absent Modality are scored.
NOT_CHEST_RADIOGRAPH_MODALITIES = frozenset(
    {
        "CT", "MR", "PT", "NM", "US", "MG", "XA", "RF", "IO", "PX", "OP", "OPT", "OCT",
        "IVOCT", "IVUS", "ES", "XC", "GM", "SM", "RTIMAGE", "BMD", "DG", "TG", "LS",
    }
)  # fmt: skip
# ViewPosition (PS3.3 C.8.11.5: DX's enumerated values; CR sites write free text) of lateral
# and oblique projections. The model learned frontal (AP/PA) radiographs only, and a PACS sends
# every image of a study, so the lateral of a PA + lateral pair would otherwise get its own
# NORMAL / PNEUMONIA. Decubitus views (RLD, LLD) are frontal projections and are scored.
NOT_FRONTAL_VIEWS = frozenset({"LL", "RL", "LLO", "RLO", "LAT", "LATERAL"})
# BodyPartExamined (PS3.16 Annex L defined terms, plus common free text) of radiographs that are
# not of the chest. A PACS routing every CR/DX image of the department would otherwise get a
# NORMAL / PNEUMONIA answer for a hand or a knee. A deny-list, not an allow-list: sites write the
# chest as CHEST, THORAX, TORAX, LUNG, PORT CHEST and more, and an absent value is common, so
# only parts that are certainly not a chest radiograph are refused. Compared without spaces,
# hyphens or underscores ("L SPINE" is LSPINE).
NOT_CHEST_BODY_PARTS = frozenset(
    {
        "ABDOMEN", "ABDOMENPELVIS", "ANKLE", "ARM", "BRAIN", "BREAST", "CALCANEUS", "CLAVICLE",
        "COCCYX", "CSPINE", "ELBOW", "EXTREMITY", "FACE", "FEMUR", "FIBULA", "FINGER", "FOOT",
        "FOREARM", "HAND", "HEAD", "HEEL", "HIP", "HUMERUS", "JAW", "KNEE", "KUB", "LEG",
        "LSPINE", "LSSPINE", "MANDIBLE", "MAXILLA", "NECK", "NOSE", "ORBIT", "PATELLA",
        "PELVIS", "SACRUM", "SCAPULA", "SHOULDER", "SINUS", "SKULL", "SPINE", "SSPINE",
        "THIGH", "THUMB", "TIBIA", "TLSPINE", "TMJ", "TOE", "TSPINE", "WRIST", "ZYGOMA",
    }
)  # fmt: skip


# SOP classes of images "for processing": raw detector data meant for the modality's own
# processing, not for display (PS3.3 A.26: DX, mammography and intra-oral), which a PACS may hold
# beside the "for presentation" image of the same exposure.
FOR_PROCESSING_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray - For Processing
        "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray - For Processing
    }
)


def is_for_processing(sop_class_uid: object, presentation_intent: object) -> bool:
    return (
        str(sop_class_uid or "").strip() in FOR_PROCESSING_CLASSES
        or str(presentation_intent or "").strip().upper() == "FOR PROCESSING"
    )


def is_frontal_view(view_position: object) -> bool:
    """False for a lateral or oblique ViewPosition; an absent or empty one counts as frontal."""
    return str(view_position or "").strip().upper() not in NOT_FRONTAL_VIEWS


def is_chest_body_part(body_part: object) -> bool:
    """False for a BodyPartExamined that is certainly not the chest; absent counts as chest."""
    return re.sub(r"[\s_-]+", "", str(body_part or "")).upper() not in NOT_CHEST_BODY_PARTS


def _uids(ds) -> dict[str, str]:
    """The UIDs the answer echoes; a multi-valued one (non-conformant) is left out rather than
    echoed as a Python list's text."""
    found = {}
    for tag in UID_TAGS:
        try:
            value = ds.get(tag)
        except Exception:  # noqa: BLE001, S112 - an unparsable element counts as absent
            continue
        if value and isinstance(value, str):
            found[tag] = str(value)
    return found


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear window (PS3.3 C.11.2.1.2.1) straight to 0..255."""
    width = max(float(width), 1.0)
    low = center - 0.5 - (width - 1) / 2
    if width == 1.0:  # the standard's limit: a threshold at the centre (no 0 / 0)
        return np.where(values > low, 255.0, 0.0)
    scaled = (values - low) / (width - 1)
    return np.clip(scaled, 0.0, 1.0) * 255.0


def _first(value) -> float:
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _valid_window(ds) -> bool:
    """The standard requires a window width of at least 1 (PS3.3 C.11.2.1.2.1); a zero, negative
    or unreadable one is ignored like an absent window, rather than thresholding the image."""
    try:
        width, center = _first(ds.WindowWidth), _first(ds.WindowCenter)
    except (TypeError, ValueError, IndexError):
        return False
    return bool(np.isfinite(center)) and bool(np.isfinite(width)) and width >= 1.0


def _padding(ds, stored: np.ndarray) -> np.ndarray | None:
    """Where the stored values are Pixel Padding (PS3.3 C.7.5.1.1.2: the area outside a shutter
    or a non-rectangular detector, often the largest or smallest value the bits allow), so that
    the min-max stretch spans the radiograph, not the padding; None when there is none."""
    if "PixelPaddingValue" not in ds:
        return None
    try:
        value = int(ds.PixelPaddingValue)
        limit = int(ds.get("PixelPaddingRangeLimit", value))
    except (TypeError, ValueError):
        return None
    low, high = sorted((value, limit))
    return (stored >= low) & (stored <= high)


# Integer pixel data spanning at most this many values goes through a lookup table.
LUT_MAX_ENTRIES = 1 << 17
LUT_ROWS_PER_CHUNK = 256


def to_8bit(ds, stored: np.ndarray) -> np.ndarray:
    """Modality LUT, then VOI (LUT sequence or window), then MONOCHROME1 inversion, to uint8.

    Every step is a function of the stored value alone (the min-max stretch uses the extremes
    of the values present), so for integer pixel data the chain runs once per possible value
    and the image is mapped through the resulting table: the same bytes as `to_8bit_direct`
    (tested), without its several float64 copies of the image: for a 3000 x 3500 12-bit
    radiograph, 59 MB peak allocation and 45 ms to decode instead of 378 MB and 70 ms."""
    if stored.dtype.kind not in "ui" or stored.size == 0:
        return to_8bit_direct(ds, stored)
    low, high = int(stored.min()), int(stored.max())
    if high - low + 1 > LUT_MAX_ENTRIES:
        return to_8bit_direct(ds, stored)
    entries = high - low + 1
    # Row chunks bound the int64 index temporaries (a whole-image copy would be 84 MB).
    chunks = [
        stored[start : start + LUT_ROWS_PER_CHUNK]
        for start in range(0, stored.shape[0], LUT_ROWS_PER_CHUNK)
    ]
    counts = np.zeros(entries, dtype=np.int64)
    for rows in chunks:
        counts += np.bincount(rows.astype(np.int64).ravel() - low, minlength=entries)
    domain = np.arange(low, high + 1, dtype=np.int64).astype(stored.dtype)
    table = to_8bit_direct(ds, domain, present=counts > 0)
    out = np.empty(stored.shape, dtype=np.uint8)
    for index, rows in enumerate(chunks):
        start = index * LUT_ROWS_PER_CHUNK
        out[start : start + len(rows)] = table[rows.astype(np.int64) - low]
    return out


def to_8bit_direct(ds, stored: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
    """`to_8bit` computed on every element; `present` (for a table over a value range) marks
    the values that occur in the image, which alone set the min-max stretch."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        lut_item = ds.VOILUTSequence[0]
        # The VOI LUT is indexed by modality-LUT output, which is integral for radiographs.
        out = np.asarray(apply_voi_lut(np.rint(values).astype(np.int64), ds), dtype=np.float64)
        bits = int(lut_item.LUTDescriptor[2]) if "LUTDescriptor" in lut_item else 16
        peak = float(out.max() if present is None else out[present].max())
        top = float(2**bits - 1) if peak <= 2**bits - 1 else peak
        eight = out * 255.0 / max(top, 1.0)
    elif "WindowCenter" in ds and "WindowWidth" in ds and _valid_window(ds):
        eight = _window(values, _first(ds.WindowCenter), _first(ds.WindowWidth))
    else:
        bits_stored = int(ds.get("BitsStored", 8))
        rescaled = "RescaleSlope" in ds or "RescaleIntercept" in ds
        if bits_stored <= 8 and not rescaled:
            # The stored range is the display range (fewer than 8 bits is stretched to it, and
            # signed values are shifted into it); 8-bit unsigned pixels are used as they are.
            signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
            offset = 2.0 ** (bits_stored - 1) if signed else 0.0
            eight = (values + offset) * 255.0 / max(2.0**bits_stored - 1, 1.0)
        else:
            counted = np.ones(values.shape, bool) if present is None else present.copy()
            padding = _padding(ds, stored)
            if padding is not None and (counted & ~padding).any():
                counted &= ~padding
            seen = values[counted]
            low, high = float(seen.min()), float(seen.max())
            eight = (values - low) * 255.0 / max(high - low, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        eight = 255.0 - eight
    return np.clip(np.rint(eight), 0, 255).astype(np.uint8)


def _to_gray(ds, stored: np.ndarray, photometric: str) -> np.ndarray:
    if stored.ndim == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            stored = convert_color_space(stored, photometric, "RGB")
        return np.asarray(Image.fromarray(stored.astype(np.uint8), "RGB").convert("L"))
    return to_8bit(ds, stored)


DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
# File meta elements whose length field is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN",
                             b"UR", b"UT"})  # fmt: skip
# Beyond the largest image accepted (RGB at max_pixels), room for the other attributes.
DEFLATED_HEADROOM_BYTES = 16 * 1024 * 1024


def file_meta_end_and_syntax(data: bytes) -> tuple[int, str | None]:
    """Where the File Meta Information group (0002, always Explicit VR Little Endian) of a
    Part 10 file ends, and its Transfer Syntax UID; the walk stops at the first element that is
    not group 0002 or does not fit, and pydicom then judges the file."""
    offset, syntax = 132, None
    while offset + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, offset)
        if group != 0x0002:
            break
        if data[offset + 4 : offset + 6] in LONG_LENGTH_VRS:
            if offset + 12 > len(data):
                break
            (length,) = struct.unpack_from("<I", data, offset + 8)
            value = offset + 12
        else:
            (length,) = struct.unpack_from("<H", data, offset + 6)
            value = offset + 8
        if value + length > len(data):
            break
        if element == 0x0010:
            syntax = data[value : value + length].rstrip(b"\0 ").decode("ascii", "replace")
        offset = value + length
    return offset, syntax


def inflated_data_set(data: bytes, start: int, max_pixels: int) -> bytes:
    """A Deflated Explicit VR Little Endian data set, inflated here first with a bound: pydicom
    inflates it whole, in memory, so a few megabytes of deflated zeros would become gigabytes
    (zlib reaches ~1000:1) and end the process. The bound is the largest data set an accepted
    image needs; beyond it the file is refused."""
    limit = 3 * max_pixels + DEFLATED_HEADROOM_BYTES
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    parts, size, view, step = [], 0, memoryview(data)[start:], 1 << 20
    try:
        for chunk_start in range(0, len(view), step):
            pending = view[chunk_start : chunk_start + step]
            while pending:
                parts.append(inflater.decompress(pending, 1 << 22))
                size += len(parts[-1])
                pending = inflater.unconsumed_tail
                if size > limit:
                    raise ImageTooLargeError(
                        "The deflated DICOM data set inflates beyond "
                        f"{limit // (1 << 20)} MB, more than any accepted radiograph needs "
                        "(a decompression bomb): send it uncompressed or with a compressed "
                        "pixel transfer syntax."
                    )
    except zlib.error as exc:
        raise UndecodableImageError(
            "The deflated DICOM data set could not be inflated (truncated or corrupt)."
        ) from exc
    return b"".join(parts)


# pydicom parses a data set element by element in Python, ~2 us and ~150 bytes each: a 64 MB
# upload of 7.9 million empty elements took it 15 s and 1.1 GB (a deflated one, up to the
# inflate bound above, more). A radiograph's data set holds hundreds to a few thousand
# elements, nested ones included; beyond this many it is refused after a walk of ~50 ms.
MAX_DICOM_ELEMENTS = 50_000
UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA_TAG = (0x7FE0, 0x0010)


def count_elements(data: bytes, start: int, explicit: bool, little: bool, limit: int) -> int:
    """Element and item headers from `start` to the top-level Pixel Data, nested ones included
    (sequences of defined or undefined length, implicit VR inside an undefined-length UN),
    walked by their length fields; the walk stops past `limit`, and early (with the count so
    far) wherever it cannot follow the encoding: pydicom then judges the file."""
    from pydicom.datadict import dictionary_VR

    order = "<" if little else ">"
    offset, count = start, 0
    # Open sequences: (where a defined-length one ends, or None; explicit VR inside)
    stack: list[tuple[int | None, bool]] = []
    while True:
        while stack and stack[-1][0] is not None and offset >= stack[-1][0]:
            stack.pop()
        if offset + 8 > len(data):
            return count
        count += 1
        if count > limit:
            return count
        group, element = struct.unpack_from(order + "HH", data, offset)
        if group == 0xFFFE:  # an item, an item's end or a sequence's end: no VR
            offset += 8
            if element == 0xE0DD:  # closes the innermost sequence of undefined length
                while stack and stack.pop()[0] is not None:
                    pass
            continue  # an item's elements follow it
        if (group, element) == PIXEL_DATA_TAG and not stack:
            return count_fragments(data, offset, explicit, order, count, limit)
        vr: bytes | None = None
        if stack[-1][1] if stack else explicit:
            vr = data[offset + 4 : offset + 6]
            if not (vr.isalpha() and vr.isupper()):
                return count
            if vr in LONG_LENGTH_VRS:
                if offset + 12 > len(data):
                    return count
                (length,) = struct.unpack_from(order + "I", data, offset + 8)
                offset += 12
            else:
                (length,) = struct.unpack_from(order + "H", data, offset + 6)
                offset += 8
        else:
            (length,) = struct.unpack_from(order + "I", data, offset + 4)
            offset += 8
        inside_explicit = stack[-1][1] if stack else explicit
        if length == UNDEFINED_LENGTH:
            if vr in (None, b"SQ"):
                stack.append((None, inside_explicit))
            elif vr == b"UN":  # PS3.5 6.2.2: its items are implicit VR little endian
                stack.append((None, False))
            else:  # encapsulated pixel data in a nested data set: not ours to walk
                return count
            continue
        if vr == b"SQ" or (vr is None and _dictionary_vr(dictionary_VR, group, element) == "SQ"):
            stack.append((offset + length, inside_explicit))
            continue
        offset += length


def count_fragments(
    data: bytes, offset: int, explicit: bool, order: str, count: int, limit: int
) -> int:
    """`count` plus the items of the encapsulated Pixel Data element at `offset` (its Basic
    Offset Table and fragments: pydicom gathers a frame from them one by one, 1.8 s for a
    million empty ones in 8 MB), up to `limit`; native Pixel Data adds nothing."""
    header = 12 if explicit else 8
    if offset + header > len(data):
        return count
    (length,) = struct.unpack_from(order + "I", data, offset + header - 4)
    if length != UNDEFINED_LENGTH:
        return count
    offset += header
    while offset + 8 <= len(data) and count <= limit:
        group, element, length = struct.unpack_from(order + "HHI", data, offset)
        if group != 0xFFFE or element != 0xE000:  # the sequence's end, or not an item
            return count
        count += 1
        offset += 8 + length
    return count


def _dictionary_vr(lookup, group: int, element: int) -> str | None:
    try:
        return str(lookup(group << 16 | element))
    except KeyError:
        return None


def check_data_set(data: bytes, max_pixels: int) -> None:
    """Refuse a data set that pydicom would spend gigabytes or seconds on before it parses it:
    a deflate bomb (`inflated_data_set`) or more than MAX_DICOM_ELEMENTS elements."""
    from pydicom.uid import UID

    start, syntax = file_meta_end_and_syntax(data)
    explicit, little = True, True
    if syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        data, start = inflated_data_set(data, start, max_pixels), 0
    elif syntax and re.fullmatch(r"[0-9.]{1,64}", syntax) and UID(syntax).is_transfer_syntax:
        explicit, little = not UID(syntax).is_implicit_VR, UID(syntax).is_little_endian
    if count_elements(data, start, explicit, little, MAX_DICOM_ELEMENTS) > MAX_DICOM_ELEMENTS:
        raise UnsupportedDicomError(
            f"The DICOM data set holds more than {MAX_DICOM_ELEMENTS} elements, sequence items "
            "and pixel data fragments (a radiograph's holds a few thousand at most): it is "
            "refused unparsed. Send the image without the extra attributes, its frame in one "
            "fragment."
        )


J2K_SOC_SIZ = b"\xff\x4f\xff\x51"  # JPEG 2000 Start Of Codestream, then its SIZ segment
# The JPEG (ITU T.81, including the retired processes), JPEG-LS and JPEG 2000 / HTJ2K syntaxes,
# whose frames carry a header this module reads. RLE decodes into what the data set gives;
# video and private syntaxes have no decoder here (pydicom names them).
FRAME_HEADER_SYNTAXES = frozenset(
    {
        *(f"1.2.840.10008.1.2.4.{process}" for process in range(50, 67)),
        "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
        "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    }
)  # fmt: skip


@dataclass(frozen=True)
class FrameHeader:
    """What a compressed frame's own header declares, which is what its decoder allocates."""

    columns: int
    rows: int
    components: int
    tiles: int = 1  # JPEG 2000 only
    code_blocks: int = 0  # JPEG 2000 only: precincts and code-blocks, at most (j2k_code_blocks)


J2K_SOT, J2K_SOD, J2K_COD, J2K_COC = 0xFF90, 0xFF93, 0xFF52, 0xFF53


def j2k_coding(frame: bytes, start: int, components: int) -> tuple[int, int, int, int, int]:
    """The smallest code-block and precinct exponents and the most decomposition levels that
    any COD or COC segment of a JPEG 2000 codestream sets, in its main header or a tile-part
    header: (levels, xcb, ycb, ppx, ppy), code-block sides 2^(xcb + 2) and precinct sides
    2^pp (15, the largest, where none are set). Segments that do not fit end the walk."""
    levels, xcb, ycb, ppx, ppy = 0, 8, 8, 15, 15
    offset, tile_parts = start + 2, 0
    while offset + 4 <= len(frame):
        marker, length = struct.unpack_from(">HH", frame, offset)
        if marker == J2K_SOT:
            tile_parts += 1
            if tile_parts > 4 * MAX_J2K_TILES:  # not walked: taken as the costliest coding
                return 32, 0, 0, 0, 0
            if offset + 12 > len(frame):
                break
            (tile_part,) = struct.unpack_from(">I", frame, offset + 6)
            header_end = frame.find(b"\xff\x93", offset)
            if header_end == -1:
                break
            # this tile-part's header, then the next tile-part (Psot 0: the last, to the end)
            found = j2k_coding(frame[offset + 10 : header_end], 0, components)
            levels, xcb, ycb = max(levels, found[0]), min(xcb, found[1]), min(ycb, found[2])
            ppx, ppy = min(ppx, found[3]), min(ppy, found[4])
            if tile_part == 0:
                break
            offset += tile_part
            continue
        if marker in (J2K_COD, J2K_COC) and 12 <= length and offset + 2 + length <= len(frame):
            body = offset + 4 + (1 if marker == J2K_COD else (1 if components < 257 else 2))
            style = frame[offset + 4] if marker == J2K_COD else frame[body]
            coding = body + (4 if marker == J2K_COD else 1)  # past SGcod / Scoc
            levels = max(levels, frame[coding])
            xcb, ycb = min(xcb, frame[coding + 1] & 0x0F), min(ycb, frame[coding + 2] & 0x0F)
            if style & 0x01:  # precinct sizes given, one byte per resolution level
                for value in frame[coding + 5 : offset + 2 + length]:
                    ppx, ppy = min(ppx, value & 0x0F), min(ppy, value >> 4)
        if marker == J2K_SOD or length < 2:
            break
        offset += 2 + length
    return levels, xcb, ycb, ppx, ppy


def j2k_code_blocks(columns: int, rows: int, components: int, coding: tuple) -> int:
    """How many precincts and code-blocks OpenJPEG sets up for a frame coded so, at most: it
    allocates them for the whole image before decoding any (a 96-byte codestream of a 7000 x
    7000 frame in 4 x 4 code-blocks took 1.2 GB). A code-block never spans more than its
    precinct (half of it in a resolution's detail bands)."""
    levels, xcb, ycb, ppx, ppy = coding
    total = 0
    for resolution in range(min(levels, 32) + 1):
        scale = 1 << (min(levels, 32) - resolution)
        width, height = -(-columns // scale), -(-rows // scale)
        total += -(-width // (1 << ppx)) * -(-height // (1 << ppy))
        if resolution == 0:
            bands, band_w, band_h, limit_x, limit_y = 1, width, height, ppx, ppy
        else:
            bands, band_w, band_h = 3, -(-width // 2), -(-height // 2)
            limit_x, limit_y = max(ppx - 1, 0), max(ppy - 1, 0)
        block_w, block_h = 1 << min(xcb + 2, limit_x), 1 << min(ycb + 2, limit_y)
        total += bands * -(-band_w // block_w) * -(-band_h // block_h)
    return total * components


def frame_header(frame: bytes) -> FrameHeader | None:
    """The JPEG or JPEG-LS Start Of Frame segment, or the JPEG 2000 SIZ segment (in a bare
    codestream or a JP2 file), of a compressed frame; None where there is none before the
    image data."""
    if frame[:2] == b"\xff\xd8":
        found = jpeg_frame(frame)
        return None if found is None else FrameHeader(*found)
    # At 0 in a bare codestream, as PS3.5 8.2.4 asks; after the boxes of a JP2 file (which
    # some encoders write anyway, an ICC profile among them) within the first megabyte.
    start = frame.find(J2K_SOC_SIZ, 0, 1 << 20)
    if start == -1 or start + 42 > len(frame):
        return None
    x_size, y_size, x_origin, y_origin, x_tile, y_tile, x_tile_origin, y_tile_origin, count = (
        struct.unpack_from(">IIIIIIIIH", frame, start + 8)
    )
    if x_tile == 0 or y_tile == 0 or x_tile_origin > x_size or y_tile_origin > y_size:
        return None
    tiles = -(-(x_size - x_tile_origin) // x_tile) * -(-(y_size - y_tile_origin) // y_tile)
    columns, rows = x_size - x_origin, y_size - y_origin
    blocks = j2k_code_blocks(columns, rows, count, j2k_coding(frame, start, count))
    return FrameHeader(columns, rows, count, tiles, blocks)


# OpenJPEG allocates some 10 KB per JPEG 2000 tile before decoding any (measured: 48,000 tiles
# of a 7000 x 7000 frame took 530 MB; it refuses more than 65,535). Radiographs are coded as
# one tile or a few hundred; beyond this many, the frame is refused.
MAX_J2K_TILES = 4096
# ~400 bytes each in OpenJPEG (1.2 GB for 3 million): at most ~200 MB.
MAX_J2K_CODE_BLOCKS = 500_000


def check_frame_header(ds, rows: int, columns: int) -> None:
    """A compressed frame decodes to what its own header declares, whatever the data set says:
    a 224 x 224 data set could carry a 60,000 x 60,000 JPEG-LS or JPEG 2000 frame of a few
    kilobytes, or one with 255 components, and have the decoder allocate gigabytes (measured:
    a 12,000 px JPEG-LS frame was decoded whole before the mismatch was found). The frame's
    header is read first and must agree with the data set's Rows, Columns and Samples per
    Pixel (checked against the pixel limit already). RLE decodes into what the data set
    gives, so it needs no check."""
    from pydicom.encaps import generate_frames

    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax not in FRAME_HEADER_SYNTAXES:  # RLE, video, private: nothing read here
        return
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception as exc:
        raise UndecodableImageError(
            "The DICOM's encapsulated pixel data holds no readable frame (truncated or corrupt)."
        ) from exc
    header = frame_header(frame)
    if header is None:
        raise UndecodableImageError(
            f"The compressed frame (transfer syntax {syntax}) has no JPEG or JPEG 2000 frame "
            "header before its image data (truncated or corrupt)."
        )
    if (header.columns, header.rows) != (columns, rows):
        raise UndecodableImageError(
            f"The compressed frame is {header.columns} x {header.rows} pixels by its own "
            f"header, but the data set's Columns and Rows say {columns} x {rows}: the object "
            "is inconsistent."
        )
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if header.components != samples:
        raise UndecodableImageError(
            f"The compressed frame has {header.components} components by its own header, but "
            f"the data set's Samples per Pixel says {samples}: the object is inconsistent."
        )
    if header.code_blocks > MAX_J2K_CODE_BLOCKS:
        raise UnsupportedDicomError(
            f"The JPEG 2000 frame is coded in about {header.code_blocks} code-blocks and "
            f"precincts (at most {MAX_J2K_CODE_BLOCKS} are decoded; 64 x 64 code-blocks, the "
            "usual size, make 12,000 for 50 megapixels): re-encode it with larger code-blocks "
            "or precincts, or send it uncompressed."
        )
    if header.tiles > MAX_J2K_TILES:
        raise UnsupportedDicomError(
            f"The JPEG 2000 frame is cut into {header.tiles} tiles (at most {MAX_J2K_TILES} "
            "are decoded): re-encode it with larger tiles, or send it uncompressed."
        )


def decode_dicom(data: bytes, *, max_pixels: int, min_side: int) -> DecodedImage:
    """Decode a single-frame DICOM radiograph to the model input, or raise an InputError."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    check_data_set(data, max_pixels)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except (
        InvalidDicomError,
        EOFError,
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
        OverflowError,
    ) as exc:
        raise UndecodableImageError(
            f"The DICOM file could not be parsed: {type(exc).__name__}."
        ) from exc
    uids = _uids(ds)
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise UnsupportedDicomError(
            "The DICOM object stores floating-point pixels (Float Pixel Data), which no "
            "radiograph storage class uses: send the CR/DX image with integer Pixel Data."
        )
    if "PixelData" not in ds:
        raise UnsupportedDicomError(
            "The DICOM object has no Pixel Data: send an image object (CR/DX/DR), not a "
            "report, presentation state or other non-image SOP."
        )
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in NOT_CHEST_RADIOGRAPH_MODALITIES:
        raise UnsupportedDicomError(
            f"Modality {modality} is not a projection radiograph: pneumoscan scores chest "
            "radiographs (Modality CR or DX) only."
        )
    try:
        view = ds.get("ViewPosition", "")
        body_part = ds.get("BodyPartExamined", "")
        for_processing = is_for_processing(
            ds.get("SOPClassUID", ""), ds.get("PresentationIntentType", "")
        )
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
        # Unreadable: judged on the pixels like absent ones.
        view, body_part, for_processing = "", "", False
    if for_processing:
        raise UnsupportedDicomError(
            "This is a 'for processing' image (raw detector data, not meant for display): send "
            "the 'for presentation' image of the exposure, as the PACS shows it."
        )
    if not is_frontal_view(view):
        raise UnsupportedDicomError(
            f"ViewPosition {str(view).strip().upper()} is a lateral or oblique projection: "
            "pneumoscan scores frontal (AP or PA) chest radiographs only."
        )
    if not is_chest_body_part(body_part):
        raise UnsupportedDicomError(
            f"BodyPartExamined {str(body_part).strip().upper()} is not the chest: pneumoscan "
            "scores chest radiographs only."
        )
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        rows, columns = int(ds.Rows), int(ds.Columns)
        photometric = str(ds.PhotometricInterpretation)
        bits_allocated = int(ds.get("BitsAllocated", 8) or 8)
        one_bit = 1 in (int(ds.get("BitsStored", 8) or 8), bits_allocated)
    except (AttributeError, ValueError, TypeError, KeyError) as exc:
        raise UndecodableImageError(
            "The DICOM image lacks Rows, Columns, bit depth or PhotometricInterpretation, or "
            "one of them is not a number or text."
        ) from exc
    if frames > 1:
        raise UnsupportedDicomError(
            f"Multi-frame DICOM ({frames} frames) is not accepted: send one radiograph per "
            "instance."
        )
    if one_bit:
        raise UnsupportedDicomError(
            "The pixel data is 1-bit (a bitmap, such as a scanned form or an overlay), not a "
            "radiograph: send the CR/DX image."
        )
    if bits_allocated > 16:
        # Radiographs are 8 to 16 bits (the DX and CR image modules); wider samples took the
        # grey-level path 12 times the upload in memory (735 MB for 61 MB of 32-bit pixels),
        # which a compressed frame of a few KB could declare too.
        raise UnsupportedDicomError(
            f"The pixel data has {bits_allocated} bits per sample: pneumoscan scores "
            "radiographs of 8 to 16 bits, as CR and DX modalities store them."
        )
    if photometric not in ACCEPTED_PHOTOMETRIC:
        raise UnsupportedDicomError(
            f"Photometric interpretation {photometric!r} is not supported; use MONOCHROME1, "
            "MONOCHROME2 or RGB."
        )
    try:
        check_dimensions(columns, rows, max_pixels, min_side)
    except ImageTooLargeError:
        raise
    check_frame_header(ds, rows, columns)
    try:
        stored = ds.pixel_array
    except NotImplementedError as exc:
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        raise UnsupportedDicomError(
            f"No decoder for transfer syntax {syntax}: send uncompressed, JPEG, JPEG-LS, "
            "JPEG 2000 or RLE."
        ) from exc
    except Exception as exc:
        raise UndecodableImageError(
            f"The DICOM pixel data could not be decoded (truncated or corrupt): "
            f"{type(exc).__name__}."
        ) from exc
    if not (stored.ndim == 2 or (stored.ndim == 3 and stored.shape[-1] == 3)):
        raise UnsupportedDicomError(f"Unexpected pixel array shape {stored.shape}.")
    try:
        gray = _to_gray(ds, stored, photometric)
    except Exception as exc:
        raise UnsupportedDicomError(
            f"The DICOM grey-level transforms (rescale, VOI LUT or window) could not be "
            f"applied: {type(exc).__name__}."
        ) from exc
    return DecodedImage(
        pixels=resize_to_model(Image.fromarray(gray, mode="L")),
        format="DICOM",
        width=columns,
        height=rows,
        dicom=uids,
        source=ds,
        patient_age=patient_age(ds),
    )
