"""DICOM decoding: photometric interpretations, bit depths, VOI, compressed syntaxes, refusals."""

from __future__ import annotations

import io
from copy import deepcopy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from app.dicom import to_8bit
from app.errors import ImageTooLargeError, InputError, UndecodableImageError, UnsupportedDicomError
from app.imaging import decode_image
from tests.conftest import FIXTURES
from tests.utils.dicom_factory import base_dataset, make_dicom
from tests.utils.mutation import assert_decodes_or_refuses, mutate

REFERENCE_PATH = FIXTURES / "chest_xray" / "NORMAL" / "NORMAL2-IM-0744-0001.jpeg"


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return np.asarray(Image.open(REFERENCE_PATH).convert("L"))


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("bits", [6, 8, 12, 16])
def test_bit_depths_and_photometric(reference: np.ndarray, photometric: str, bits: int) -> None:
    """8-bit values pass through, fewer bits are scaled from their stored range (before, 6-bit
    pixels came out as 0..63, a near-black image); deeper data with no VOI is stretched
    min..max to 0..255."""
    decoded = decode_image(make_dicom(reference, bits=bits, photometric=photometric))
    assert decoded.format == "DICOM"
    expected = reference.astype(np.float64)
    if bits > 8:
        expected = (expected - expected.min()) * 255.0 / (expected.max() - expected.min())
    quantisation = 1.0 if bits >= 8 else 255 / (2**bits - 1) / 2  # 6 bits: steps of 4
    assert mad(decoded.pixels, np.rint(expected).astype(np.uint8)) < quantisation


@pytest.mark.parametrize("bits", [12, 16])
def test_window_center_width(reference: np.ndarray, bits: int) -> None:
    top = 2**bits - 1
    data = make_dicom(reference, bits=bits, window=((top + 1) / 2, top + 1))
    assert mad(decode_image(data).pixels, reference) < 1.5


def test_voi_lut_sequence(reference: np.ndarray) -> None:
    data = make_dicom(reference, bits=12, voi_lut=True)
    assert mad(decode_image(data).pixels, reference) < 1.0


def test_voi_lut_then_monochrome1_inverted(reference: np.ndarray) -> None:
    data = make_dicom(reference, bits=12, voi_lut=True, photometric="MONOCHROME1")
    assert mad(decode_image(data).pixels, reference) < 1.0


def test_rescale_slope_intercept_before_window(reference: np.ndarray) -> None:
    # Stored 0..4095 with slope 2, intercept -1000: modality values -1000..7190.
    data = make_dicom(reference, bits=12, rescale=(2.0, -1000.0), window=(3095.0, 8192.0))
    assert mad(decode_image(data).pixels, reference) < 1.5


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless, "jpeg-baseline"])
def test_compressed_syntaxes(reference: np.ndarray, syntax: str) -> None:
    decoded = decode_image(make_dicom(reference, bits=8, syntax=syntax))
    assert mad(decoded.pixels, reference) < 2.0


@pytest.mark.parametrize(
    ("name", "syntax", "tolerance"),
    [
        ("jpeg-lossless-sv1-12bit.dcm", "1.2.840.10008.1.2.4.70", 0.0),
        ("jpeg-extended-12bit.dcm", "1.2.840.10008.1.2.4.51", 0.1),
    ],
)
def test_jpeg_syntaxes_of_cr_dx_archives(
    reference: np.ndarray, name: str, syntax: str, tolerance: float
) -> None:
    """12-bit JPEG Lossless SV1 and JPEG Extended, as CR/DX modalities and archives send them
    (files made by DCMTK's dcmcjpeg; pydicom cannot encode them)."""
    import pydicom

    data = (FIXTURES / "dicom" / name).read_bytes()
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == syntax
    assert mad(decode_image(data).pixels, reference) <= tolerance


def test_uids_are_echoed_and_nothing_else(reference: np.ndarray) -> None:
    decoded = decode_image(make_dicom(reference))
    assert set(decoded.dicom) == {
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
    }


def _save(ds) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_no_pixel_data_refused() -> None:
    ds = base_dataset(256, 256)
    with pytest.raises(UnsupportedDicomError, match="no Pixel Data"):
        decode_image(_save(ds))


def eight_bit_dataset(photometric: str, pixels: np.ndarray):
    """A 224 x 224 8-bit dataset with the given photometric interpretation and raw pixels."""
    ds = base_dataset(224, 224)
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = pixels.tobytes()
    return ds


def test_multiframe_refused(reference: np.ndarray) -> None:
    ds = eight_bit_dataset("MONOCHROME2", np.stack([reference, reference]))
    ds.NumberOfFrames = 2
    with pytest.raises(UnsupportedDicomError, match="Multi-frame"):
        decode_image(_save(ds))


def test_palette_color_refused(reference: np.ndarray) -> None:
    ds = eight_bit_dataset("PALETTE COLOR", reference)
    with pytest.raises(UnsupportedDicomError, match="Photometric"):
        decode_image(_save(ds))


def test_cross_sectional_modality_refused_before_decoding() -> None:
    ds = eight_bit_dataset("MONOCHROME2", np.zeros((224, 224), np.uint8))
    ds.Modality = "CT"
    ds.PixelData = b"\x00" * 16  # never decoded: the Modality refuses it first
    with pytest.raises(UnsupportedDicomError, match="Modality CT is not a projection"):
        decode_image(_save(ds))


def test_signed_8_bit_pixels_are_shifted_into_the_display_range(reference: np.ndarray) -> None:
    """Two's complement 8-bit pixels (PixelRepresentation 1) span -128..127; before, every
    negative value was clipped to black."""
    signed = (reference.astype(np.int16) - 128).astype(np.int8)
    ds = eight_bit_dataset("MONOCHROME2", signed.view(np.uint8))
    ds.PixelRepresentation = 1
    assert mad(decode_image(_save(ds)).pixels, reference) < 1.0


@pytest.mark.parametrize("allocated", [1, 8])
def test_one_bit_pixel_data_refused(allocated: int) -> None:
    """A 1-bit bitmap (a scanned form, an overlay) is never a radiograph; before, it was scored
    as a near-black image."""
    from pydicom.pixels import pack_bits

    ds = base_dataset(224, 224)
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, 1, 0
    bitmap = np.random.default_rng(0).integers(0, 2, (224, 224), dtype=np.uint8)
    ds.PixelData = pack_bits(bitmap) if allocated == 1 else bitmap.tobytes()
    with pytest.raises(UnsupportedDicomError, match="1-bit"):
        decode_image(_save(ds))


@pytest.mark.parametrize("part", ["HAND", "knee", "L SPINE", "T_SPINE", " Abdomen ", "SKULL"])
def test_radiographs_of_other_body_parts_refused(reference: np.ndarray, part: str) -> None:
    """A PACS that routes every CR/DX image would otherwise get NORMAL / PNEUMONIA for a hand."""
    with pytest.raises(UnsupportedDicomError, match="is not the chest"):
        decode_image(_with(make_dicom(reference), BodyPartExamined=part))


@pytest.mark.parametrize("part", ["CHEST", "THORAX", "TORAX", "PORT CHEST", "LUNG", "", None])
def test_chest_body_parts_as_sites_write_them_are_scored(reference: np.ndarray, part) -> None:
    decoded = decode_image(_with(make_dicom(reference), BodyPartExamined=part))
    assert mad(decoded.pixels, reference) < 1.0


def _with(data: bytes, **attributes) -> bytes:
    """A DICOM file with some attributes set, or deleted where the value is None."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    for name, value in attributes.items():
        if value is None:
            delattr(ds, name)
        else:
            setattr(ds, name, value)
    return _save(ds)


@pytest.mark.parametrize("view", ["LL", "RL", "RLO", "LLO", " lateral "])
def test_lateral_and_oblique_views_refused(reference: np.ndarray, view: str) -> None:
    """A PACS sends both images of a PA + lateral study; the model only learned frontal views."""
    with pytest.raises(UnsupportedDicomError, match="lateral or oblique projection"):
        decode_image(_with(make_dicom(reference), ViewPosition=view))


@pytest.mark.parametrize(
    "attributes",
    [
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1.1"},
        {"PresentationIntentType": "FOR PROCESSING"},
    ],
)
def test_for_processing_images_refused(reference: np.ndarray, attributes: dict) -> None:
    """Raw detector data a PACS may hold beside the displayed image of the same exposure."""
    with pytest.raises(UnsupportedDicomError, match="for processing"):
        decode_image(_with(make_dicom(reference), **attributes))


def test_for_presentation_images_scored(reference: np.ndarray) -> None:
    data = _with(
        make_dicom(reference),
        SOPClassUID="1.2.840.10008.5.1.4.1.1.1.1",
        PresentationIntentType="FOR PRESENTATION",
    )
    assert mad(decode_image(data).pixels, reference) < 1.0


@pytest.mark.parametrize("view", ["PA", "AP", "LLD", "RLD", ""])
def test_frontal_decubitus_and_unstated_views_scored(reference: np.ndarray, view: str) -> None:
    decoded = decode_image(_with(make_dicom(reference), ViewPosition=view))
    assert mad(decoded.pixels, reference) < 1.0


@pytest.mark.parametrize("width", [0.0, -10.0])
def test_invalid_window_width_is_ignored_not_applied(reference: np.ndarray, width: float) -> None:
    """The standard requires a width of at least 1: an invalid one is treated as absent
    (min-max stretch) instead of thresholding the radiograph into a blank frame."""
    data = make_dicom(reference, bits=12, window=(2048.0, 4096.0))
    without = decode_image(_with(data, WindowCenter=None, WindowWidth=None)).pixels
    invalid = decode_image(_with(data, WindowWidth=width)).pixels
    np.testing.assert_array_equal(invalid, without)
    assert invalid.std() > 20  # the radiograph, not a thresholded frame


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_pixel_padding_is_left_out_of_the_stretch(reference: np.ndarray, photometric: str) -> None:
    """A 12-bit radiograph inside a padding frame at the top of the range (a shutter), no window:
    the stretch spans the radiograph's own values, as without the frame, and the frame renders
    at the end of the scale the padding value sits at."""
    import pydicom

    framed = np.full((264, 264), 255, np.uint8)
    framed[20:-20, 20:-20] = reference
    ds = pydicom.dcmread(io.BytesIO(make_dicom(framed, bits=12, photometric=photometric)))
    stored = ds.pixel_array
    ds.PixelPaddingValue = int(stored[0, 0])  # 4095, or 0 for MONOCHROME1
    inner = pydicom.dcmread(io.BytesIO(make_dicom(reference, bits=12, photometric=photometric)))
    got = to_8bit(ds, stored)
    np.testing.assert_array_equal(got[20:-20, 20:-20], to_8bit(inner, inner.pixel_array))
    assert (got[:20] == 255).all()
    ds.PixelPaddingValue = 1  # absent from the image: the stretch is unchanged
    np.testing.assert_array_equal(to_8bit(ds, stored), to_8bit(_without_padding(ds), stored))


def _without_padding(ds):
    copy = deepcopy(ds)
    del copy.PixelPaddingValue
    return copy


def test_float_pixel_data_refused_by_name(reference: np.ndarray) -> None:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(make_dicom(reference)))
    del ds.PixelData
    ds.BitsAllocated = 32
    ds.FloatPixelData = reference.astype(np.float32).tobytes()
    with pytest.raises(UnsupportedDicomError, match="Float Pixel Data"):
        decode_image(_save(ds))


def test_dicom_bomb_refused_before_decoding() -> None:
    ds = base_dataset(60000, 60000)
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = b"\x00" * 64
    with pytest.raises(ImageTooLargeError):
        decode_image(_save(ds))


def test_truncated_dicom_is_undecodable(reference: np.ndarray) -> None:
    data = make_dicom(reference, bits=16)
    with pytest.raises(UndecodableImageError):
        decode_image(data[: len(data) // 2])


def test_corrupt_dicom_header_is_refused_with_422() -> None:
    data = b"\x00" * 128 + b"DICM" + b"\xff" * 64
    with pytest.raises(InputError) as caught:
        decode_image(data)
    assert caught.value.status_code == 422


@pytest.fixture(scope="module")
def dicom_blobs(reference: np.ndarray) -> dict:
    """Fixed DICOM files (UIDs are random per build, so build once for hypothesis)."""
    small = reference[:128, :128]
    return {
        (syntax, bits): make_dicom(small, bits=bits, syntax=syntax)
        for syntax in (None, RLELossless, "jpeg-baseline")
        for bits in (8, 12)
        if not (syntax == "jpeg-baseline" and bits == 12)
    }


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_mutated_dicom_decodes_or_raises_the_domain_error(dicom_blobs, data) -> None:
    """Flipped bytes and cut tails in real DICOMs (including RLE, whose Rust decoder panics
    on some corruptions): decoded, or InputError; nothing else."""
    blob = dicom_blobs[data.draw(st.sampled_from(sorted(dicom_blobs, key=str)))]
    # Mutations start after the preamble and 'DICM' prefix, so the file stays a DICOM.
    assert_decodes_or_refuses(mutate(data, blob, first=132, min_flips=1))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_lookup_table_path_gives_the_same_bytes_as_the_direct_one(data: st.DataObject) -> None:
    """`to_8bit` maps integer pixels through a table built by the same grey-level chain that
    `to_8bit_direct` applies to every pixel: both must give identical bytes for any bit depth,
    sign, rescale, window, VOI LUT and photometric interpretation."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from app.dicom import to_8bit, to_8bit_direct

    bits = data.draw(st.sampled_from([8, 10, 12, 14, 16]), label="bits")
    signed = data.draw(st.booleans(), label="signed") and bits > 8
    dtype = np.dtype(f"{'i' if signed else 'u'}{1 if bits == 8 else 2}")
    lowest, highest = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    lo = data.draw(st.integers(lowest, highest), label="lo")
    hi = data.draw(st.integers(lo, highest), label="hi")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    stored = rng.integers(lo, hi + 1, size=(37, 29)).astype(dtype)
    ds = Dataset()
    ds.BitsStored = bits
    ds.PixelRepresentation = int(signed)
    ds.PhotometricInterpretation = data.draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2"]))

    def lut_item(bits_out: int) -> Dataset:
        """A scrambled (non-monotonic) LUT over every stored value: extremes of the output
        then depend on which values occur, the case the table path must get right."""
        item = Dataset()
        entries = 2**bits
        item.add_new(0x00283002, "US", [entries if entries < 65536 else 0, 0, bits_out])
        item.add_new(0x00283006, "US", [(v * 7919) % 2**bits_out for v in range(entries)])
        return item

    modality = data.draw(st.sampled_from(["none", "rescale", "lut"]), label="modality")
    if modality == "rescale":
        ds.RescaleSlope = data.draw(st.sampled_from([1, 0.5, 2, 1.7]))
        ds.RescaleIntercept = data.draw(st.sampled_from([0, -1024, 100.5]))
    elif modality == "lut" and not signed:
        ds.ModalityLUTSequence = Sequence([lut_item(16)])
        ds.RescaleType = "US"
    voi = data.draw(st.sampled_from(["none", "window", "lut"]), label="voi")
    if voi == "window":
        ds.WindowCenter = data.draw(st.floats(-3000, 70000, allow_nan=False))
        ds.WindowWidth = data.draw(st.floats(1, 70000, allow_nan=False))
    elif voi == "lut" and not signed and modality == "none":
        item = lut_item(16)
        # a descriptor narrower than the data: the stretch then uses the largest value seen
        item[0x00283002].value = [*item[0x00283002].value[:2], data.draw(st.sampled_from([10, 16]))]
        ds.VOILUTSequence = Sequence([item])
    if data.draw(st.booleans(), label="padding"):
        # a padding value (and sometimes a range) that may or may not occur in the image
        ds.PixelPaddingValue = data.draw(st.integers(lo, hi), label="padding value")
        if data.draw(st.booleans(), label="padding range"):
            ds.PixelPaddingRangeLimit = data.draw(st.integers(lo, hi), label="padding limit")
    np.testing.assert_array_equal(to_8bit(ds, stored), to_8bit_direct(ds, stored))


def _with_syntax(data: bytes, syntax: str) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = syntax
    return _save(ds)


def test_a_deflated_data_set_decodes_like_the_uncompressed_one(reference: np.ndarray) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    plain = make_dicom(reference, bits=12)
    deflated = _with_syntax(plain, DeflatedExplicitVRLittleEndian)
    assert len(deflated) < len(plain)
    assert np.array_equal(decode_image(deflated).pixels, decode_image(plain).pixels)


def test_a_deflate_bomb_is_refused_before_pydicom_inflates_it(reference: np.ndarray) -> None:
    """pydicom inflates a deflated data set whole, in memory: a 1 MB upload of deflated zeros
    took 214 s and 2 GB there, and the 64 MB an upload may be would end the process."""
    import time
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from app.dicom_bounds import file_meta_end_and_syntax

    deflated = _with_syntax(make_dicom(reference), DeflatedExplicitVRLittleEndian)
    start, syntax = file_meta_end_and_syntax(deflated)
    assert syntax == DeflatedExplicitVRLittleEndian
    squeezer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 24)
    body = b"".join(squeezer.compress(zeros) for _ in range(12)) + squeezer.flush()  # 192 MB
    began = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="inflates beyond"):
        decode_image(deflated[:start] + body)
    assert time.perf_counter() - began < 10
    # within the bound (the limit follows max_pixels), corrupt deflate data is named as such
    with pytest.raises(UndecodableImageError, match="could not be inflated"):
        decode_image(deflated[:start] + b"\xff" * 1000)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless, "jpeg-baseline"])
def test_a_compressed_frame_larger_than_the_data_set_says_is_refused_undecoded(
    syntax: str,
) -> None:
    """A small data set carrying a frame whose own header declares far more pixels: the
    decoder would allocate what the frame declares (a 12,000 px JPEG-LS frame was decoded
    whole before the mismatch was noticed), so the header is read first."""
    import pydicom
    from pydicom.encaps import generate_frames

    from app.dicom_bounds import frame_header

    large = np.zeros((1200, 1000), np.uint8)
    large[::7, ::5] = 200
    ds = pydicom.dcmread(io.BytesIO(make_dicom(large, bits=8, syntax=syntax)))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    header = frame_header(frame)
    assert (header.columns, header.rows, header.components) == (1000, 1200, 1)
    ds.Rows, ds.Columns = 256, 256
    with pytest.raises(UndecodableImageError, match="1000 x 1200 pixels by its own header"):
        decode_image(_save(ds))


def test_frame_headers_are_found_past_other_segments() -> None:
    from app.dicom_bounds import FrameHeader, frame_header

    image = Image.new("L", (300, 200), 90)
    exif = Image.Exif()
    exif[0x010E] = "x" * 5000  # a long APP1 segment before the frame header
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes(), progressive=True)
    assert frame_header(out.getvalue()) == FrameHeader(300, 200, 1)
    assert frame_header(b"\xff\xd8\xff\xff\xda\x00\x08" + bytes(8)) is None  # no frame header
    assert frame_header(b"\xff\xd8\xff\xc0\x00") is None  # cut short
    assert frame_header(b"not a codestream") is None


def _encapsulated(frame: bytes, syntax: str, rows: int, columns: int, samples: int = 1) -> bytes:
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(io.BytesIO(make_dicom(np.full((64, 64), 100, np.uint8), bits=8)))
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    return _save(ds)


def test_a_compressed_frame_with_more_components_than_samples_is_refused() -> None:
    rgb = io.BytesIO()
    Image.new("RGB", (300, 200), (90, 20, 200)).save(rgb, "JPEG")
    data = _encapsulated(rgb.getvalue(), "1.2.840.10008.1.2.4.50", rows=200, columns=300)
    with pytest.raises(UndecodableImageError, match="3 components by its own header"):
        decode_image(data)


def j2k_codestream(
    side: int,
    tile: int,
    levels: int = 0,
    block: int = 4,
    precinct: int | None = None,
    in_tile_header: bool = False,
) -> bytes:
    """A JPEG 2000 codestream header (SOC, SIZ, COD, QCD) of one 8-bit component in
    `tile` x `tile` tiles, `levels` decomposition levels, code-blocks of 2^(block + 2) and
    (when given) precincts of 2^precinct, and one empty tile-part; `in_tile_header` moves the
    code-block size into a COD of the tile-part's header (a main COD keeps 64 x 64)."""
    import struct

    def cod(block_exponent: int) -> bytes:
        sizes = b"" if precinct is None else bytes([precinct * 0x11] * (levels + 1))
        body = struct.pack(
            ">BBHBBBBBB", precinct is not None, 0, 1, 0, levels, block_exponent,
            block_exponent, 0, 1,
        ) + sizes  # fmt: skip
        return b"\xff\x52" + struct.pack(">H", 2 + len(body)) + body

    siz = struct.pack(">HHIIIIIIIIH3B", 41, 0, side, side, 0, 0, tile, tile, 0, 0, 1, 7, 1, 1)
    bands = 1 + 3 * levels
    qcd = b"\xff\x5c" + struct.pack(">HB", 3 + bands, 0x40) + bytes([0x08] * bands)
    tile_header = cod(block) if in_tile_header else b""
    sot = b"\xff\x90" + struct.pack(">HHIBB", 10, 0, 0, 0, 1) + tile_header + b"\xff\x93"
    main = cod(4 if in_tile_header else block)
    return b"\xff\x4f\xff\x51" + siz + main + qcd + sot + b"\xff\xd9"


def test_a_jpeg_2000_frame_cut_into_thousands_of_tiles_is_refused_undecoded() -> None:
    """OpenJPEG allocates per tile before decoding: 48,000 tiles of a 7000 x 7000 frame in a
    200-byte codestream took 530 MB."""
    from app.dicom_bounds import MAX_J2K_TILES, frame_header

    many = j2k_codestream(7000, 64)
    header = frame_header(many)
    assert (header.columns, header.rows, header.tiles) == (7000, 7000, 110 * 110)
    assert 110 * 110 > MAX_J2K_TILES
    with pytest.raises(UnsupportedDicomError, match="12100 tiles"):
        decode_image(_encapsulated(many, JPEG2000Lossless, rows=7000, columns=7000))
    assert frame_header(j2k_codestream(7000, 7000)).tiles == 1
    assert frame_header(j2k_codestream(4000, 512)).tiles == 64
    # a JP2 file (its boxes, here a 20 KB one, then the codestream), as some encoders write
    jp2 = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + (20_008).to_bytes(4, "big") + b"free" + bytes(20_000)
    wrapped = jp2 + b"\x00\x00\x00\x00jp2c" + j2k_codestream(3000, 3000)
    header = frame_header(wrapped)
    assert (header.columns, header.rows, header.components, header.tiles) == (3000, 3000, 1, 1)


def _with_private_elements(ds, count: int, group: int = 0x0009) -> None:
    for index in range(count):
        ds.add_new(((group + 2 * (index // 0xF000)) << 16) | (0x1000 + index % 0xF000), "LO", "")


@pytest.mark.parametrize("undefined", [False, True], ids=["defined length", "delimited"])
@pytest.mark.parametrize("encoding", ["explicit little", "implicit little", "deflated"])
def test_a_data_set_of_endless_elements_is_refused_before_pydicom_parses_it(
    reference: np.ndarray, encoding: str, undefined: bool
) -> None:
    """pydicom parses element by element in Python: a 64 MB upload of 7.9 million empty elements
    took it 15 s and 1.1 GB (and a deflated one could hold more). The elements are counted
    first, nested ones included, and beyond 50,000 the file is refused in ~50 ms."""
    import time

    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

    from app.dicom_bounds import MAX_DICOM_ELEMENTS

    syntax = {
        "explicit little": None,
        "implicit little": ImplicitVRLittleEndian,
        "deflated": DeflatedExplicitVRLittleEndian,
    }[encoding]
    ds = pydicom.dcmread(io.BytesIO(make_dicom(reference)))
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    # hidden one level down, in an item of a sequence the decoder never reads
    item = Dataset()
    _with_private_elements(item, MAX_DICOM_ELEMENTS + 100)
    ds.ReferencedImageSequence = Sequence([item])
    ds["ReferencedImageSequence"].is_undefined_length = undefined
    bomb = _save(ds)
    began = time.perf_counter()
    with pytest.raises(UnsupportedDicomError, match="more than 50000 elements"):
        decode_image(bomb)
    assert time.perf_counter() - began < 2
    # the same data set with a radiograph's share of extra elements is scored
    del ds.ReferencedImageSequence
    _with_private_elements(ds, 3000)
    assert decode_image(_save(ds)).format == "DICOM"


def test_an_element_bomb_inside_an_undefined_length_un_is_counted(reference: np.ndarray) -> None:
    """An undefined-length UN element holds implicit VR items whatever the file's encoding
    (PS3.5 6.2.2), which pydicom parses as a sequence: the walk follows it there."""
    import struct

    from app.dicom_bounds import file_meta_end_and_syntax

    data = make_dicom(reference)
    start, _ = file_meta_end_and_syntax(data)
    # after the file's group 0008 elements, before the rest (tags ascend)
    offset = start
    while struct.unpack_from("<H", data, offset)[0] <= 0x0008:
        vr = data[offset + 4 : offset + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV"):
            offset += 12 + struct.unpack_from("<I", data, offset + 8)[0]
        else:
            offset += 8 + struct.unpack_from("<H", data, offset + 6)[0]
    un = struct.pack("<HH2sHI", 0x0009, 0x1001, b"UN", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    inner = b"".join(struct.pack("<HHI", 0x0011, 0x1000 + i % 0xF000, 0) for i in range(60_000))
    ends = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    with pytest.raises(UnsupportedDicomError, match="elements"):
        decode_image(data[:offset] + un + item + inner + ends + data[offset:])


def test_the_element_walk_reaches_the_pixel_data_of_real_files() -> None:
    """Sequences of defined and undefined length, an icon image with Pixel Data of its own,
    and every DICOM fixture: the walk ends at the top-level Pixel Data, counting about what
    pydicom parses."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import UID, ImplicitVRLittleEndian

    from app.dicom_bounds import count_elements, file_meta_end_and_syntax

    def walked(data: bytes) -> int:
        start, syntax = file_meta_end_and_syntax(data)
        uid = UID(syntax)
        return count_elements(data, start, not uid.is_implicit_VR, uid.is_little_endian, 10**6)

    for path in sorted((FIXTURES / "dicom").glob("*.dcm")):
        data = path.read_bytes()
        parsed = sum(1 for _ in pydicom.dcmread(io.BytesIO(data)).iterall())
        assert parsed <= walked(data) <= 2 * parsed + 10, path.name
    ds = pydicom.dcmread(io.BytesIO(make_dicom(np.full((64, 64), 90, np.uint8))))
    icon = Dataset()
    icon.Rows, icon.Columns, icon.BitsAllocated, icon.SamplesPerPixel = 8, 8, 8, 1
    icon.PixelData = bytes(64)
    code = Dataset()
    code.CodeValue, code.CodeMeaning = "123", "x"
    ds.IconImageSequence = Sequence([icon])
    ds.AnatomicRegionSequence = Sequence([code, code])
    for syntax in (None, ImplicitVRLittleEndian):
        if syntax is not None:
            ds.file_meta.TransferSyntaxUID = syntax
        for undefined in (False, True):
            ds["IconImageSequence"].is_undefined_length = undefined
            ds["AnatomicRegionSequence"].is_undefined_length = undefined
            data = _save(ds)
            parsed = sum(1 for _ in pydicom.dcmread(io.BytesIO(data)).iterall())
            assert parsed <= walked(data) <= 2 * parsed + 10, (syntax, undefined)


@pytest.mark.parametrize(
    ("coding", "blocks"),
    [
        ({"block": 0}, 3_064_696),  # 4 x 4 code-blocks: 1.2 GB in OpenJPEG
        ({"block": 4, "precinct": 1}, 65_295_920),  # 2 x 2 precincts clip the code-blocks
        ({"block": 0, "in_tile_header": True}, 3_064_696),  # set in a tile-part's header
    ],
    ids=["tiny code-blocks", "tiny precincts", "in a tile-part header"],
)
def test_a_jpeg_2000_frame_of_millions_of_code_blocks_is_refused_undecoded(
    coding: dict, blocks: int
) -> None:
    """OpenJPEG sets up every code-block and precinct of a tile before decoding any: a
    96-byte codestream of a 7000 x 7000 frame in 4 x 4 code-blocks took 1.2 GB."""
    from app.dicom_bounds import MAX_J2K_CODE_BLOCKS, frame_header

    data = j2k_codestream(7000, 7000, levels=5, **coding)
    assert frame_header(data).code_blocks == blocks > MAX_J2K_CODE_BLOCKS
    with pytest.raises(UnsupportedDicomError, match="code-blocks"):
        decode_image(_encapsulated(data, JPEG2000Lossless, rows=7000, columns=7000))
    # the usual coding, 64 x 64 code-blocks and no precincts, of the same frame
    assert frame_header(j2k_codestream(7000, 7000, levels=5)).code_blocks == 12_232


def test_the_code_blocks_of_real_jpeg_2000_frames_are_few() -> None:
    import pydicom
    from pydicom.encaps import generate_frames

    from app.dicom_bounds import frame_header

    noise = np.random.default_rng(0).integers(0, 255, (3000, 2500)).astype(np.uint8)
    ds = pydicom.dcmread(io.BytesIO(make_dicom(noise, bits=8, syntax=JPEG2000Lossless)))
    header = frame_header(next(generate_frames(ds.PixelData, number_of_frames=1)))
    assert (header.columns, header.rows, header.tiles) == (2500, 3000, 1)
    assert 1000 < header.code_blocks < 3000  # 64 x 64 blocks over 5 levels: ~1,900


def test_a_video_syntax_is_named_not_called_corrupt() -> None:
    """Frame headers are read only for the JPEG, JPEG-LS and JPEG 2000 syntaxes: an MPEG-2
    object is told it has no decoder here, as before the frame checks."""
    data = _encapsulated(
        b"\x00\x00\x01\xb3" + bytes(60), "1.2.840.10008.1.2.4.100", rows=480, columns=640
    )
    with pytest.raises(UnsupportedDicomError, match="No decoder for transfer syntax"):
        decode_image(data)


def test_a_frame_in_endless_fragments_is_refused_before_pydicom_gathers_them() -> None:
    """pydicom gathers an encapsulated frame fragment by fragment: a million empty fragments
    (8 MB) took it 1.8 s. They count with the elements; a frame in a few fragments decodes."""
    import struct

    import pydicom

    out = io.BytesIO()
    Image.new("L", (256, 256), 100).save(out, "JPEG")
    jpeg = out.getvalue() + b"\0" * (len(out.getvalue()) % 2)

    def fragmented(pieces: list[bytes]) -> bytes:
        ds = pydicom.dcmread(io.BytesIO(_encapsulated(jpeg, "1.2.840.10008.1.2.4.50", 256, 256)))
        items = struct.pack("<HHI", 0xFFFE, 0xE000, 0)  # an empty Basic Offset Table
        items += b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(p)) + p for p in pieces)
        ds.PixelData = items + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        return _save(ds)

    assert decode_image(fragmented([jpeg[:1000], jpeg[1000:]])).format == "DICOM"
    with pytest.raises(UnsupportedDicomError, match="fragments"):
        decode_image(fragmented([jpeg] + [b""] * 60_000))


def test_samples_wider_than_16_bits_are_refused_by_name() -> None:
    """Radiographs are 8 to 16 bits; 61 MB of 32-bit pixels took the grey-level path 735 MB."""
    ds = base_dataset(64, 64)
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    ds.PixelData = np.arange(64 * 64, dtype=np.uint32).tobytes()
    with pytest.raises(UnsupportedDicomError, match="32 bits per sample"):
        decode_image(_save(ds))
