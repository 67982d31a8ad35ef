"""A battery of hostile and odd inputs against a real uvicorn on loopback: every one gets its
documented answer (never a 5xx), the server log holds no traceback, and the service still
scores a normal radiograph afterwards."""

from __future__ import annotations

import gzip
import io
import json
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.common import BENCH_KEY, running_server
from tests.conftest import fixture_bytes
from tests.utils.jpeg_scans import progressive_with_repeated_scan

JPEG = fixture_bytes("originals/person495_bacteria_2094.jpeg")
DICOM = fixture_bytes("dicom/person1946_bacteria_4874.dcm")
RADIOGRAPH = Image.open(io.BytesIO(JPEG)).convert("L")
HEADERS = {"X-API-Key": BENCH_KEY}


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def png_bomb_header(side: int = 20000) -> bytes:
    """A valid PNG signature and IHDR claiming side x side pixels, with a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
        + chunk(b"IEND", b"")
    )


def dicom_with(**attributes) -> bytes:
    """The DICOM fixture with some attributes changed."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(DICOM))
    for name, value in attributes.items():
        setattr(ds, name, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def png_with_text_bomb() -> bytes:
    """The radiograph as a PNG whose zTXt chunk inflates 50 MB of text from ~50 KB."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "A" * 50_000_000, zip=True)
    return encode(RADIOGRAPH, pnginfo=info)


def dicom_deflate_bomb() -> bytes:
    """The DICOM fixture's file meta saying Deflated Explicit VR Little Endian, then ~200 KB
    of deflate data that inflates to 200 MB of zeros (pydicom inflates it whole)."""
    from app.dicom_bounds import file_meta_end_and_syntax

    deflated = dicom_with_syntax("1.2.840.10008.1.2.1.99")
    start, _ = file_meta_end_and_syntax(deflated)
    squeezer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 24)
    return (
        deflated[:start]
        + b"".join(squeezer.compress(zeros) for _ in range(12))
        + (squeezer.flush())
    )


def dicom_with_nested_sequences(depth: int) -> bytes:
    """The DICOM fixture with `depth` sequences of undefined length nested in one another
    (20 bytes each), before its other elements."""
    from app.dicom_bounds import file_meta_end_and_syntax

    start, _ = file_meta_end_and_syntax(DICOM)
    sequence = struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    ends = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return DICOM[:start] + (sequence + item) * depth + ends * depth + DICOM[start:]


def dicom_of_endless_elements(count: int = 60_000) -> bytes:
    """The DICOM fixture with `count` empty private elements (~0.5 MB; 64 MB of them took
    pydicom 15 s and 1.1 GB to parse)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(DICOM))
    for index in range(count):
        ds.add_new(((0x0009 + 2 * (index // 0xF000)) << 16) | (0x1000 + index % 0xF000), "LO", "")
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def dicom_with_syntax(syntax: str) -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(DICOM))
    ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def dicom_with_a_larger_frame() -> bytes:
    """A 224 x 224 data set whose JPEG-LS frame declares 9000 x 9000 pixels (a few KB)."""
    import jpeg_ls
    import pydicom
    from pydicom.encaps import encapsulate

    frame = bytes(jpeg_ls.encode(np.zeros((9000, 9000), np.uint8)))
    ds = pydicom.dcmread(io.BytesIO(DICOM))
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


SIXTEEN_BIT = Image.fromarray(np.asarray(RADIOGRAPH).astype(np.uint16) * 257)
GREY = Image.new("L", (300, 300), 128)

# name: (how it is sent, bytes, expected status, expected error code or None for a 200)
CASES: dict[str, tuple[str, bytes, int, str | None]] = {
    "jpeg": ("multipart", JPEG, 200, None),
    "png RGBA": ("multipart", encode(RADIOGRAPH.convert("RGBA")), 200, None),
    "png grey + alpha": ("multipart", encode(RADIOGRAPH.convert("LA")), 200, None),
    "png 16-bit": ("multipart", encode(SIXTEEN_BIT), 200, None),
    "png 1-bit": ("multipart", encode(RADIOGRAPH.convert("1")), 422, "unsupported_image"),
    "png palette": ("multipart", encode(RADIOGRAPH.convert("P")), 200, None),
    "jpeg progressive": ("multipart", encode(RADIOGRAPH, "JPEG", progressive=True), 200, None),
    # a Multi-Picture JPEG (cameras and phones): its primary image is scored, as viewers show it
    "jpeg MPO": (
        "multipart",
        encode(RADIOGRAPH, "MPO", save_all=True, append_images=[RADIOGRAPH.resize((160, 94))]),
        200,
        None,
    ),
    "png zTXt bomb": ("multipart", png_with_text_bomb(), 422, "image_too_large"),
    "progressive jpeg of 5,000 scans": (
        "multipart",
        progressive_with_repeated_scan(4000, 5000),
        422,
        "undecodable_image",
    ),
    "jpeg of a million empty segments": (
        "multipart",
        JPEG[:2] + b"\xff\xe5\x00\x02" * 1_000_000 + JPEG[2:],
        422,
        "undecodable_image",
    ),
    "png iCCP bomb": (
        "multipart",
        encode(RADIOGRAPH, icc_profile=bytes(50_000_000)),
        422,
        "image_too_large",
    ),
    "jpeg CMYK": ("multipart", encode(RADIOGRAPH.convert("CMYK"), "JPEG"), 200, None),
    "dicom": ("multipart", DICOM, 200, None),
    "dicom as the body": ("body:application/dicom", DICOM, 200, None),
    "jpeg as an octet-stream body": ("body:application/octet-stream", JPEG, 200, None),
    "jpeg sent as image/png": ("body:image/png", JPEG, 200, None),  # sniffed, not trusted
    "gif": ("multipart", encode(GREY, "GIF"), 415, "unsupported_media_type"),
    "bmp": ("multipart", encode(GREY, "BMP"), 415, "unsupported_media_type"),
    "tiff": ("multipart", encode(GREY, "TIFF"), 415, "unsupported_media_type"),
    "webp": ("multipart", encode(GREY, "WEBP"), 415, "unsupported_media_type"),
    "random bytes": (
        "multipart",
        np.random.default_rng(0).bytes(1 << 20),
        415,
        "unsupported_media_type",
    ),
    "text": ("multipart", b"hello world", 415, "unsupported_media_type"),
    "pdf": ("multipart", b"%PDF-1.4\n" + b"0" * 1000, 415, "unsupported_media_type"),
    "dicom deflated": ("multipart", dicom_with_syntax("1.2.840.10008.1.2.1.99"), 200, None),
    "dicom deflate bomb": ("multipart", dicom_deflate_bomb(), 422, "image_too_large"),
    "dicom frame larger than its rows": (
        "multipart",
        dicom_with_a_larger_frame(),
        422,
        "undecodable_image",
    ),
    # under the element limit: pydicom's recursion ends in a refusal, from a decode thread
    "dicom nested 10,000 deep": (
        "multipart",
        dicom_with_nested_sequences(10_000),
        422,
        "undecodable_image",
    ),
    # over it: refused by the element count before pydicom parses it
    "dicom nested 50,000 deep": (
        "multipart",
        dicom_with_nested_sequences(50_000),
        422,
        "unsupported_dicom",
    ),
    "dicom of 60,000 elements": (
        "multipart",
        dicom_of_endless_elements(),
        422,
        "unsupported_dicom",
    ),
    "dicom lateral view": ("multipart", dicom_with(ViewPosition="LL"), 422, "unsupported_dicom"),
    "dicom of a hand": ("multipart", dicom_with(BodyPartExamined="HAND"), 422, "unsupported_dicom"),
    "jpeg gzip-encoded": (
        "body-gzip:image/jpeg",
        gzip.compress(JPEG),
        415,
        "unsupported_media_type",
    ),
    "dicom without preamble": ("multipart", DICOM[128:], 415, "unsupported_media_type"),
    "jpeg as text/plain": ("body:text/plain", JPEG, 415, "unsupported_media_type"),
    "body without content type": ("body:", JPEG, 415, "unsupported_media_type"),
    "json body": ("body:application/json", b'{"file": "x"}', 415, "unsupported_media_type"),
    "uniform frame": ("multipart", encode(GREY), 422, "blank_image"),
    "8 x 60000 jpeg": (
        "multipart",
        encode(Image.new("L", (60000, 8)), "JPEG"),
        422,
        "image_too_small",
    ),
    "png bomb header": ("multipart", png_bomb_header(), 422, "image_too_large"),
    "half a jpeg": ("multipart", JPEG[: len(JPEG) // 2], 422, "undecodable_image"),
    "jpeg marker only": ("multipart", b"\xff\xd8\xff", 422, "undecodable_image"),
    "empty file": ("multipart", b"", 422, "undecodable_image"),
    "a third of a dicom": ("multipart", DICOM[: len(DICOM) // 3], 422, "undecodable_image"),
    "empty body": ("body:image/jpeg", b"", 422, "missing_file"),
    "wrong field name": ("multipart:image", JPEG, 422, "missing_file"),
    "two files": ("multipart:two", JPEG, 422, "missing_file"),
    "wrong boundary": ("multipart:bad-boundary", JPEG, 422, "missing_file"),
}


def send(client: httpx.Client, url: str, how: str, data: bytes) -> httpx.Response:
    if how == "multipart":
        return client.post(url, files={"file": ("x", data)}, headers=HEADERS)
    if how == "multipart:image":
        return client.post(url, files={"image": ("x", data)}, headers=HEADERS)
    if how == "multipart:two":
        files = [("file", ("a", data)), ("file", ("b", data))]
        return client.post(url, files=files, headers=HEADERS)
    if how == "multipart:bad-boundary":
        body = b'--zzz\r\nContent-Disposition: form-data; name="file"\r\n\r\n' + data
        headers = {**HEADERS, "Content-Type": "multipart/form-data; boundary=yyy"}
        return client.post(url, content=body, headers=headers)
    if how.startswith("body-gzip:"):
        headers = {**HEADERS, "Content-Type": how.split(":")[1], "Content-Encoding": "gzip"}
        return client.post(url, content=data, headers=headers)
    content_type = how.removeprefix("body:")
    headers = {**HEADERS, **({"Content-Type": content_type} if content_type else {})}
    return client.post(url, content=data, headers=headers)


def raw_exchange(url: str, request: bytes) -> bytes:
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as sock:
        sock.sendall(request)
        return sock.recv(4096)


@pytest.fixture(scope="module")
def server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    with running_server(tiny_store, tmp_path_factory.mktemp("hostile")) as running:
        yield running


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as http:
        yield http


@pytest.mark.parametrize("name", list(CASES))
def test_each_upload_gets_its_documented_answer(server: dict, client, name: str) -> None:
    how, data, status, code = CASES[name]
    response = send(client, f"{server['url']}/predict", how, data)
    assert response.status_code == status, response.text[:300]
    body = response.json()
    if code is None:
        assert body["label"] in {"NORMAL", "PNEUMONIA"}
        assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    else:
        assert body["error"]["code"] == code
        assert len(body["error"]["message"]) > 20  # says what to do, not just a code


def test_other_routes_refuse_cleanly(server: dict, client) -> None:
    url = server["url"]
    answers = {
        "/explain/" + "0" * 32: 404,
        "/explain/../../etc/passwd": 404,
        "/explain/" + "a" * 5000: 422,
        "/models/99": 404,
        "/predict": 405,
    }
    for path, status in answers.items():
        response = client.get(url + path, headers=HEADERS)
        assert response.status_code == status, path[:40]
        assert "error" in response.json()
    wrong_key = client.post(
        f"{url}/predict", files={"file": ("x", JPEG)}, headers={"X-API-Key": "x"}
    )
    assert wrong_key.status_code == 401
    assert wrong_key.json()["error"]["code"] == "unauthorized"
    sr_for_jpeg = client.post(
        f"{url}/predict",
        files={"file": ("x", JPEG)},
        headers={**HEADERS, "Accept": "application/dicom"},
    )
    assert sr_for_jpeg.status_code == 406


@pytest.mark.parametrize("route", ["prediction", "study"])
def test_readings_refuse_hostile_bodies(server: dict, client, route: str) -> None:
    """The routes with a JSON body: bounded before it is read, strict about its content."""
    url = server["url"]
    made = client.post(f"{url}/predict", files={"file": ("x", DICOM)}, headers=HEADERS).json()
    if route == "prediction":
        reading = f"{url}/predictions/{made['prediction_id']}/reading"
        unknown_url = f"{url}/predictions/{'f' * 32}/reading"
    else:
        reading = f"{url}/studies/{made['dicom']['study_instance_uid']}/reading"
        unknown_url = f"{url}/studies/1.2.3.999/reading"
    json_headers = {**HEADERS, "Content-Type": "application/json"}

    def endless():
        yield b'{"label": "'
        for _ in range(1000):  # 64 MB if it were read to the end
            yield b"N" * 65536

    cases = [
        (b'{"label": "NORMAL"' + b" " * 10**6 + b"}", 413),
        (endless(), 413),
        (b'{"label": ["NORMAL"]}', 422),
        (b'{"label": "NORMAL", "label": "PNEUMONIA", "x": 1}', 422),
        (b"\xff\xfe not json", 422),
        (b"", 422),
    ]
    for body, status in cases:
        answer = client.put(reading, content=body, headers=json_headers)
        assert answer.status_code == status, (status, answer.text[:200])
        assert "error" in answer.json()
    unknown = client.put(unknown_url, json={"label": "NORMAL"}, headers=HEADERS)
    # an unknown prediction is not found; an unscored study's read is held for its images
    assert unknown.status_code == (404 if route == "prediction" else 202)
    accepted = client.put(reading, json={"label": "NORMAL"}, headers=HEADERS)
    assert accepted.status_code == 200  # after all that, a proper read is still taken
    read = accepted.json() if route == "prediction" else accepted.json()["readings"][-1]
    assert read["reader_label"] == "NORMAL"


def test_health_probes_answer_head_without_a_body(server: dict, client) -> None:
    """Load balancers that probe with HEAD (HAProxy's `option httpchk`) get GET's status."""
    for path in ("/healthz", "/readyz"):
        head = client.head(server["url"] + path)
        assert head.status_code == 200, path
        assert head.content == b""
    assert client.head(server["url"] + "/predict", headers=HEADERS).status_code == 405


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def test_request_heads_are_bounded(server: dict, client) -> None:
    """Before the bound, 20 connections each sending 10 MB of one unfinished header added
    220 MB to the server's memory for good; now the head stops at 64 KB with a 431."""
    parsed = urlparse(server["url"])
    before = rss_mb(server["pid"])
    for _ in range(20):
        with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as sock:
            with pytest.raises(OSError):  # the server closes the connection mid-send
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * (10 << 20))
    assert rss_mb(server["pid"]) - before < 50
    with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for index in range(5):  # whole header lines, read by the server one by one
            sock.sendall(b"X-Pad-%d: " % index + b"a" * 16000 + b"\r\n")
            time.sleep(0.05)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    assert b'"code": "headers_too_large"' in answer
    # Heads under the bound pass, on one kept-alive connection too (the count starts again
    # with each request), and a large body is not a head.
    for _ in range(3):
        assert client.get(f"{server['url']}/healthz", headers={"X-Pad": "a" * 40000}).is_success
    body = client.post(
        f"{server['url']}/predict",
        content=b"\x00" * (2 << 20),
        headers={**HEADERS, "Content-Type": "application/octet-stream"},
    )
    assert body.status_code == 415


def test_raw_http_abuse(server: dict) -> None:
    url = server["url"]
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nX-API-Key: {BENCH_KEY}\r\n"
    head += "Content-Type: image/jpeg\r\n"
    huge = raw_exchange(url, (head + "Content-Length: 99999999999\r\n\r\n").encode())
    assert huge.startswith(b"HTTP/1.1 413"), huge[:100]
    chunked = (head + "Transfer-Encoding: chunked\r\n\r\n").encode()
    chunked += f"{len(JPEG):x}\r\n".encode() + JPEG + b"\r\n0\r\n\r\n"
    answer = raw_exchange(url, chunked)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
    assert raw_exchange(url, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")


# Patient attributes as non-conformant modalities write them. Before round 19, the SR answer
# (what the Orthanc plugin asks for) was a 500 for the birth date, and highdicom's warning put
# the one-part name in the server log.
NON_CONFORMANT_PATIENT = {
    "PatientName": "Smithersonian",
    "PatientBirthDate": "1980-01-02",
    "PatientSex": "Femenino",
    "StudyTime": "25:99",
    "PatientAge": "45 anos",
    "AccessionNumber": "ACC-0123456789-0123456789",  # over SH's 16 characters
}


def test_non_conformant_patient_attributes_are_answered_and_never_logged(
    server: dict, client
) -> None:
    import warnings

    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns while the fixture is written
        data = dicom_with(**NON_CONFORMANT_PATIENT)
    for accept in ("application/dicom", "application/fhir+json", "application/json"):
        response = client.post(
            f"{server['url']}/predict",
            files={"file": ("x", data)},
            headers={**HEADERS, "Accept": accept},
        )
        assert response.status_code == 200, (accept, response.text[:300])
    sr = pydicom.dcmread(io.BytesIO(_last_sr(client, server, data)))
    assert str(sr.PatientName) == "Smithersonian^"  # the same name (PS3.5 6.2.1.2)
    assert sr.PatientBirthDate == "" and sr.PatientSex == "" and sr.StudyTime == ""
    assert sr.AccessionNumber == NON_CONFORMANT_PATIENT["AccessionNumber"]  # kept: the PACS
    log = server["log"].read_text()  # matches the SR to its order by it
    for value in NON_CONFORMANT_PATIENT.values():
        assert value not in log, value


def _last_sr(client, server: dict, data: bytes) -> bytes:
    response = client.post(
        f"{server['url']}/predict",
        files={"file": ("x", data)},
        headers={**HEADERS, "Accept": "application/dicom"},
    )
    assert response.status_code == 200
    return response.content


def test_after_the_battery_the_service_is_healthy_and_logged_no_traceback(
    server: dict, client
) -> None:
    """Runs last in this module (pytest keeps file order): the log covers every case above."""
    url = server["url"]
    assert client.get(f"{url}/healthz").status_code == 200
    good = client.post(f"{url}/predict", files={"file": ("x", JPEG)}, headers=HEADERS)
    assert good.status_code == 200
    assert 'status="500"' not in client.get(f"{url}/metrics").text
    log = server["log"].read_text()
    assert "Traceback" not in log
    # One JSON object per line, uvicorn's own warnings included ("Invalid HTTP request
    # received." was plain text before round 18), and no exception escaped to the server.
    lines = [line for line in log.splitlines() if line.strip()]
    assert not [line for line in lines if not line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert any(r["logger"] == "uvicorn.error" for r in records)
    assert not [r for r in records if "exc_type" in r or r["level"] in ("ERROR", "CRITICAL")]


def test_a_declared_length_that_is_not_ascii_digits_is_not_a_length() -> None:
    """uvicorn's parser refuses such a Content-Length itself (400); the body reader, which
    reads the header to refuse an upload before a byte arrives, must not fail on one
    either (`"\u00b2".isdigit()` is true, and `int("\u00b2")` raises)."""
    import asyncio

    from starlette.requests import Request

    from app.admission import UploadBudget
    from app.routes.predict import read_body

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def read() -> bytes:
        scope = {
            "type": "http",
            "method": "PUT",
            "path": "/",
            "headers": [(b"content-length", "\u00b2".encode("latin-1"))],
        }
        with UploadBudget(1 << 20).hold() as holding:
            return await read_body(Request(scope, receive), 4096, 5.0, holding)

    assert asyncio.run(read()) == b"{}"
