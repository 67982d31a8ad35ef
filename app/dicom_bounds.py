"""What a DICOM file may make pydicom and the pixel decoders spend, judged from its bytes
before they run.

The decoders allocate and loop over what a file's own headers declare, not over what it
weighs, so each bound here was set after measuring a small upload that cost gigabytes or tens
of seconds: a deflated data set inflated whole (`check_data_set`: 2 GB and 214 s from 1 MB),
millions of elements or pixel data fragments parsed one by one (15 s and 1.1 GB), a compressed
frame larger than its data set says, and JPEG 2000 or progressive JPEG coding that sets up
millions of code-blocks or thousands of tiles or scans (`check_frame_header`). Everything is
read by length fields and bounded walks; where a walk cannot follow the encoding it stops, and
pydicom then judges the file.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

from app.errors import ImageTooLargeError, UndecodableImageError, UnsupportedDicomError
from app.imaging import jpeg_frame

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
