"""Build DICOM Part 10 radiographs from real pixels, in the shapes PACS send them."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

PATIENT_NAME = "Doe^Jane^Secret"
PATIENT_ID = "MRN-99887766"


def base_dataset(rows: int, columns: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    return ds


def make_dicom(
    gray8: np.ndarray,
    bits: int = 8,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    voi_lut: bool = False,
    rescale: tuple[float, float] | None = None,
    syntax: str | None = None,
    modality: str | None = "DX",
    attributes: dict[str, object] | None = None,
) -> bytes:
    """Encode an 8-bit grayscale image so that a correct reader recovers it.

    bits > 8 spreads the values over the stored range; MONOCHROME1 stores the inverse; a window
    or VOI LUT is chosen to map the stored range back to 0..255. `modality` None leaves the
    Modality attribute out; `attributes` sets further elements by keyword (PatientAge="045Y").
    """
    rows, columns = gray8.shape
    ds = base_dataset(rows, columns)
    if modality is None:
        del ds.Modality
    else:
        ds.Modality = modality
    top = 2**bits - 1
    stored = np.rint(gray8.astype(np.float64) * top / 255.0)
    if photometric == "MONOCHROME1":
        stored = top - stored
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    dtype = np.uint8 if bits <= 8 else np.uint16
    if rescale is not None:
        slope, intercept = rescale
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut:
        item = Dataset()
        entries = top + 1
        item.add_new(0x00283002, "US", [entries if entries < 65536 else 0, 0, 16])
        item.add_new(0x00283006, "US", [round(v * 65535 / top) for v in range(entries)])
        item.LUTExplanation = "linear"
        ds.VOILUTSequence = Sequence([item])
    for keyword, value in (attributes or {}).items():
        setattr(ds, keyword, value)
    ds.PixelData = stored.astype(dtype).tobytes()
    if syntax == "jpeg-baseline":
        buffer = io.BytesIO()
        Image.fromarray(stored.astype(np.uint8), "L").save(buffer, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    elif syntax is not None:
        ds.compress(syntax)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
