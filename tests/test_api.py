"""The HTTP contract: every route's happy path with real radiographs, auth, and error codes."""

from __future__ import annotations

import hashlib
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from tests.conftest import API_KEY, OTHER_KEY, fixture_bytes
from tests.utils.dicom_factory import make_dicom


def post(client, data: bytes, name: str = "image.jpeg", content_type: str = "image/jpeg", **kwargs):
    return client.post("/predict", files={"file": (name, data, content_type)}, **kwargs)


def assert_error(response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code


def test_predict_jpeg(client, pneumonia_jpeg: bytes) -> None:
    response = post(client, pneumonia_jpeg)
    assert response.status_code == 200, response.text
    body = response.json()
    assert re.fullmatch(r"[0-9a-f]{32}", body["prediction_id"])
    probs = body["probabilities"]
    assert abs(probs["NORMAL"] + probs["PNEUMONIA"] - 1) < 1e-5
    expected = "PNEUMONIA" if probs["PNEUMONIA"] >= body["threshold"] else "NORMAL"
    assert body["label"] == expected
    assert body["model"] == {"name": "pneumonia", "version": 1}
    assert body["input"]["format"] == "JPEG" and body["input"]["width"] > 224
    assert body["explain_url"] == f"/explain/{body['prediction_id']}"
    assert "not a diagnosis" in body["intended_use"].lower()
    assert body["dicom"] is None
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-request-id"]


def test_recorded_sha256_is_the_uploads_small_or_large(client) -> None:
    from app.routes.predict import HASH_INLINE_MAX_BYTES

    small = fixture_bytes("chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg")
    large = fixture_bytes("originals/NORMAL2-IM-0746-0001.jpeg")
    assert len(small) <= HASH_INLINE_MAX_BYTES < len(large)  # hashed inline / on a thread
    for data in (small, large):
        body = post(client, data).json()
        assert body["input"]["sha256"] == hashlib.sha256(data).hexdigest()
        assert body["input"]["bytes"] == len(data)


def test_same_image_in_any_container_gives_the_same_answer(client) -> None:
    jpeg = fixture_bytes("chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg")
    gray = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"))
    buffer = io.BytesIO()
    Image.fromarray(gray).convert("RGBA").save(buffer, format="PNG")
    answers = []
    for data in (
        jpeg,
        buffer.getvalue(),
        make_dicom(gray, bits=12, photometric="MONOCHROME1", voi_lut=True),
    ):
        response = post(client, data, content_type="application/octet-stream")
        assert response.status_code == 200, response.text
        answers.append(response.json()["probabilities"]["PNEUMONIA"])
    assert max(answers) - min(answers) < 0.02


def test_raw_body_upload_matches_multipart(client) -> None:
    """The bytes as the body (image/jpeg, image/png, application/dicom, octet-stream) give the
    same answer as the same bytes in multipart field `file`; the format is sniffed either way."""
    jpeg = fixture_bytes("chest_xray/PNEUMONIA/person495_bacteria_2094.jpeg")
    gray = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"))
    png = io.BytesIO()
    Image.fromarray(gray).save(png, format="PNG")
    dicom = make_dicom(gray, bits=16)
    for data, media_type, fmt in (
        (jpeg, "image/jpeg", "JPEG"),
        (png.getvalue(), "image/png", "PNG"),
        (dicom, "application/dicom", "DICOM"),
        (jpeg, "application/octet-stream", "JPEG"),
        (dicom, "image/jpeg; charset=binary", "DICOM"),  # a wrong label changes nothing
    ):
        raw = client.post("/predict", content=data, headers={"Content-Type": media_type})
        assert raw.status_code == 200, raw.text
        wrapped = post(client, data, content_type=media_type.split(";")[0])
        assert raw.json()["input"] == wrapped.json()["input"]
        assert raw.json()["input"]["format"] == fmt
        assert raw.json()["probabilities"] == pytest.approx(
            wrapped.json()["probabilities"], abs=1e-6
        )
    assert_error(
        client.post("/predict", content=b"%PDF-1.7", headers={"Content-Type": "image/png"}),
        415,
        "unsupported_media_type",
    )


def test_predict_dicom_echoes_uids_only(client) -> None:
    gray = np.asarray(
        Image.open(
            io.BytesIO(fixture_bytes("chest_xray/PNEUMONIA/person495_bacteria_2094.jpeg"))
        ).convert("L")
    )
    response = post(client, make_dicom(gray, bits=16), "x.dcm", "application/dicom")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["input"]["format"] == "DICOM"
    assert body["dicom"]["study_instance_uid"] and body["dicom"]["sop_instance_uid"]
    assert "Doe" not in response.text and "MRN" not in response.text


def test_explain_png_and_cache(client, pneumonia_jpeg: bytes) -> None:
    prediction = post(client, pneumonia_jpeg).json()
    url = prediction["explain_url"] + "?num_samples=200&num_features=3"
    first = client.get(url)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert first.headers["x-cache"] == "miss"
    image = Image.open(io.BytesIO(first.content))
    assert image.size == (224, 224) and image.mode == "RGB"
    second = client.get(url)
    assert second.headers["x-cache"] == "hit" and second.content == first.content
    # For a viewer: the same overlay at the upload's proportions (796 x 469), long side 512.
    source = client.get(url + "&shape=source")
    assert source.status_code == 200 and source.headers["x-cache"] == "hit"  # no second LIME
    shaped = Image.open(io.BytesIO(source.content))
    assert shaped.size == (512, 302) and shaped.mode == "RGB"
    back = np.asarray(shaped.resize((224, 224), Image.Resampling.BILINEAR), dtype=np.float64)
    assert np.abs(back - np.asarray(image, dtype=np.float64)).mean() < 8  # the same picture
    assert_error(client.get(url + "&shape=round"), 422, "invalid_request")


def test_explain_bounds_and_unknown_ids(client, pneumonia_jpeg: bytes) -> None:
    url = post(client, pneumonia_jpeg).json()["explain_url"]
    assert_error(client.get(url + "?num_samples=10"), 422, "invalid_request")
    assert_error(client.get(url + "?num_features=500"), 422, "invalid_request")
    assert_error(client.get("/explain/" + "0" * 32), 404, "not_found")
    assert_error(client.get("/explain/../../etc/passwd"), 404)


def test_auth_required_except_operations(client, pneumonia_jpeg: bytes) -> None:
    assert_error(post(client, pneumonia_jpeg, headers={"X-API-Key": ""}), 401, "unauthorized")
    assert_error(post(client, pneumonia_jpeg, headers={"X-API-Key": "wrong-key-xxxxxxxx"}), 401)
    assert_error(client.get("/models", headers={"X-API-Key": "nope"}), 401)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path, headers={"X-API-Key": ""}).status_code == 200


def test_keys_also_come_as_bearer_tokens(client, pneumonia_jpeg: bytes) -> None:
    """`Authorization: Bearer <key>` is the same key (before, only X-API-Key was read); a 401
    names the scheme (RFC 9110), and the key is never echoed."""
    del client.headers["X-API-Key"]
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    made = post(client, pneumonia_jpeg, headers=bearer)
    assert made.status_code == 200, made.text
    assert (
        client.get(made.json()["explain_url"] + "?num_samples=100", headers=bearer).status_code
        == 200
    )
    assert (
        client.get("/models", headers={"Authorization": f"bearer  {API_KEY} "}).status_code == 200
    )
    for wrong in (f"Basic {API_KEY}", "Bearer wrong-key-xxxxxxxx", "Bearer", API_KEY):
        for response in (
            post(client, pneumonia_jpeg, headers={"Authorization": wrong}),
            client.get("/models", headers={"Authorization": wrong}),
        ):
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == 'Bearer realm="pneumoscan"'
            assert API_KEY not in response.text
    # An explanation made with one key is another key's 404, whichever header carries it.
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    assert_error(client.get(made.json()["explain_url"], headers=other), 404)
    schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert {scheme["type"] for scheme in schemes.values()} == {"apiKey", "http"}


def test_other_keys_explanation_is_not_found(client, pneumonia_jpeg: bytes) -> None:
    url = post(client, pneumonia_jpeg).json()["explain_url"]
    assert_error(client.get(url, headers={"X-API-Key": OTHER_KEY}), 404)


def test_unsupported_and_broken_uploads(client, normal_jpeg: bytes) -> None:
    assert_error(post(client, b"%PDF-1.7 lying", "scan.jpeg"), 415, "unsupported_media_type")
    assert_error(post(client, b"<html></html>", "x.png", "image/png"), 415)
    assert_error(post(client, b"PK\x03\x04", "x.jpeg"), 415)
    assert_error(post(client, b""), 422, "undecodable_image")
    assert_error(post(client, normal_jpeg[:2000]), 422, "undecodable_image")
    small = io.BytesIO()
    Image.new("L", (20, 20)).save(small, format="PNG")
    assert_error(post(client, small.getvalue()), 422, "image_too_small")
    bomb = io.BytesIO()
    Image.new("L", (20_000, 20_000)).save(bomb, format="PNG")
    assert_error(post(client, bomb.getvalue()), 422, "image_too_large")


def test_blank_frames_are_refused_not_scored(client, normal_jpeg: bytes) -> None:
    """A black, white or flat grey frame (a failed exposure, an empty secondary capture) would
    still get NORMAL or PNEUMONIA from the model: refused with 422 in every container, and
    nothing is recorded for it. A real radiograph with a burned-in bright label still scores."""
    records = client.app.state.services.records
    before = records.count()
    for value in (0, 128, 255):
        flat = np.full((512, 400), value, np.uint8)
        for fmt in ("PNG", "JPEG"):
            buffer = io.BytesIO()
            Image.fromarray(flat).save(buffer, format=fmt)
            response = post(client, buffer.getvalue())
            assert_error(response, 422, "blank_image")
            assert "blank" in response.json()["error"]["message"]
        assert_error(post(client, make_dicom(flat, bits=12)), 422, "blank_image")
    # Faint noise on a flat frame is still blank; a radiograph with a white band is not.
    rng = np.random.default_rng(0)
    noisy = np.clip(128 + rng.normal(0, 1.5, (300, 300)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="PNG")
    assert_error(post(client, buffer.getvalue()), 422, "blank_image")
    assert records.count() == before
    labelled = np.asarray(Image.open(io.BytesIO(normal_jpeg)).convert("L")).copy()
    labelled[:20, :] = 255
    buffer = io.BytesIO()
    Image.fromarray(labelled).save(buffer, format="PNG")
    assert post(client, buffer.getvalue()).status_code == 200
    assert records.count() == before + 1


def test_dicom_of_another_modality_is_refused(client, normal_jpeg: bytes) -> None:
    """A CT slice or an ultrasound frame sent to /predict by mistake is refused by its
    Modality, before its pixels are decoded; CR, DX, OT and a missing Modality are scored."""
    gray = np.asarray(Image.open(io.BytesIO(normal_jpeg)).convert("L"))
    for modality in ("CT", "MR", "US", "MG", "XA "):
        response = post(client, make_dicom(gray, modality=modality))
        assert_error(response, 422, "unsupported_dicom")
        assert modality.strip().upper() in response.json()["error"]["message"]
    for modality in ("CR", "DX", "OT", None):
        assert post(client, make_dicom(gray, modality=modality)).status_code == 200


def test_missing_or_misnamed_field(client, normal_jpeg: bytes) -> None:
    assert_error(
        client.post("/predict", files={"image": ("a.jpeg", normal_jpeg)}), 422, "missing_file"
    )
    assert_error(client.post("/predict", data={"file": "not a file"}), 415)
    assert_error(
        client.post("/predict", content=normal_jpeg, headers={"Content-Type": "text/plain"}), 415
    )
    assert_error(
        client.post("/predict", content=b"", headers={"Content-Type": "image/jpeg"}),
        422,
        "missing_file",
    )
    many = [("file", (f"{i}.jpeg", normal_jpeg)) for i in range(3)]
    assert_error(client.post("/predict", files=many), 422, "missing_file")


def test_odd_file_names_are_harmless(client, normal_jpeg: bytes) -> None:
    for name in ("../../etc/passwd", "ñamé-😀.jpeg", "C:\\x\\y.jpeg", "a" * 1000):
        assert post(client, normal_jpeg, name).status_code == 200
    # A 10 KB part header is refused by the multipart parser as malformed: a 4xx, not a crash.
    assert_error(post(client, normal_jpeg, "a" * 10_000), 422, "missing_file")
    assert post(client, normal_jpeg).status_code == 200


def test_upload_size_limit(tiny_store, tmp_path, normal_jpeg: bytes) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import make_settings

    limit = len(normal_jpeg) + 10
    app = create_app(make_settings(tiny_store, tmp_path / "d", max_upload_bytes=limit))
    with TestClient(app, headers={"X-API-Key": API_KEY}) as limited:
        assert post(limited, normal_jpeg).status_code == 200
        padded = normal_jpeg + b"\x00" * 20
        assert_error(post(limited, padded), 413, "payload_too_large")
        raw = {"Content-Type": "image/jpeg"}
        assert limited.post("/predict", content=normal_jpeg, headers=raw).status_code == 200
        assert_error(limited.post("/predict", content=padded, headers=raw), 413)
        huge = normal_jpeg + b"\x00" * 200_000
        assert_error(post(limited, huge), 413, "payload_too_large")
        assert post(limited, normal_jpeg).status_code == 200


def test_models_and_operations(client, pneumonia_jpeg: bytes) -> None:
    models = client.get("/models").json()
    assert models["serving"] == 1 and models["versions"][0]["status"] == "serving"
    assert models["card"]["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert client.get("/healthz").json()["status"] == "alive"
    assert client.get("/readyz").json() == {
        "status": "ready",
        "model": {"name": "pneumonia", "version": 1},
    }
    post(client, pneumonia_jpeg)
    client.get("/explain/" + "f" * 32)
    metrics = client.get("/metrics").text
    assert 'pneumoscan_requests_total{method="POST",route="/predict",status="200"}' in metrics
    assert 'route="/explain/{prediction_id}",status="404"' in metrics
    assert "pneumoscan_predictions_total{" in metrics
    assert 'pneumoscan_model_version{model="pneumonia"} 1.0' in metrics
    assert "pneumoscan_request_duration_seconds_bucket" in metrics


def test_openapi_describes_contract(client) -> None:
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/predict"]["post"]
    assert "multipart/form-data" in predict["requestBody"]["content"]
    assert {"401", "413", "415", "422", "503"} <= set(predict["responses"])
    assert "X-API-Key" in json.dumps(spec["components"]["securitySchemes"])
    assert client.get("/docs").status_code == 200


def test_unknown_route_is_json_404(client) -> None:
    assert_error(client.get("/nope"), 404, "not_found")


def test_refuses_to_start_without_keys(tiny_store, tmp_path) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import make_settings

    app = create_app(make_settings(tiny_store, tmp_path / "d", api_keys=""))
    with pytest.raises(RuntimeError, match="PNEUMOSCAN_API_KEYS"):
        with TestClient(app):
            pass
    dev = create_app(make_settings(tiny_store, tmp_path / "d", api_keys="", allow_no_auth=True))
    with TestClient(dev) as open_client:
        assert (
            post(open_client, fixture_bytes("originals/NORMAL2-IM-0744-0001.jpeg")).status_code
            == 200
        )


@pytest.mark.parametrize("problem", ["no keys", "data dir not writable", "short key"])
def test_serve_says_what_keeps_it_from_starting_in_one_line(tmp_path, problem: str) -> None:
    """`pneumoscan serve` checks its settings before anything starts: exit 2 and one line
    naming the variable, instead of a start-up traceback."""
    import os
    import subprocess
    import sys

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {
        **os.environ,
        "PNEUMOSCAN_API_KEYS": {"no keys": "", "short key": "short"}.get(problem, "k" * 24),
        "PNEUMOSCAN_DATA_DIR": str(
            tmp_path / "data" if problem == "no keys" else blocker / "data"  # under a file
        ),
    }
    env.pop("PNEUMOSCAN_ALLOW_NO_AUTH", None)
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", "9"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    expected = {
        "no keys": "pneumoscan: PNEUMOSCAN_API_KEYS is empty",
        "data dir not writable": "pneumoscan: PNEUMOSCAN_DATA_DIR",
        "short key": "pneumoscan: invalid settings: Value error, every PNEUMOSCAN_API_KEYS entry",
    }[problem]
    assert lines[0].startswith(expected), lines[0]


def test_short_keys_rejected_at_settings() -> None:
    from pydantic import ValidationError

    from app.settings import Settings

    with pytest.raises(ValidationError):
        Settings(api_keys="short")


def test_upload_memory_budget_refuses_with_503_and_gives_back(
    tiny_store, tmp_path, normal_jpeg: bytes
) -> None:
    """Uploads held at once are bounded: a request that would pass the budget is refused
    before its body is read (declared length) or as it streams (chunked), and every byte a
    request took, answered or failed, is given back."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import make_settings

    settings = make_settings(
        tiny_store,
        tmp_path / "d",
        max_upload_bytes=2 * len(normal_jpeg),
        max_inflight_upload_bytes=2 * len(normal_jpeg) + 64 * 1024,  # the least allowed
    )
    app = create_app(settings)
    raw = {"Content-Type": "image/jpeg"}
    with TestClient(app, headers={"X-API-Key": API_KEY}) as client:
        budget = app.state.services.upload_budget
        assert client.post("/predict", content=normal_jpeg, headers=raw).status_code == 200
        assert post(client, normal_jpeg).status_code == 200
        assert budget.held == 0
        # other uploads in flight hold all but a little of the budget
        with budget.hold() as others:
            others.take(budget.limit - len(normal_jpeg) // 2)
            response = client.post("/predict", content=normal_jpeg, headers=raw)
            assert_error(response, 503, "overloaded")
            assert int(response.headers["retry-after"]) >= 1
            assert_error(post(client, normal_jpeg), 503, "overloaded")

            def chunks():  # no Content-Length: counted as it arrives
                for start in range(0, len(normal_jpeg), 1024):
                    yield normal_jpeg[start : start + 1024]

            assert_error(client.post("/predict", content=chunks(), headers=raw), 503)
            assert budget.held == others.bytes
        assert budget.held == 0
        assert client.post("/predict", content=normal_jpeg, headers=raw).status_code == 200
        assert_error(post(client, b"not an image at all"), 415)  # failures give back too
        assert budget.held == 0
        metrics = client.get("/metrics").text
        assert 'reason="upload_memory_full"' in metrics


def test_upload_budget_must_fit_the_largest_upload(tiny_store, tmp_path) -> None:
    from pydantic import ValidationError

    from tests.conftest import make_settings

    with pytest.raises(ValidationError, match="max_inflight_upload_bytes"):
        make_settings(
            tiny_store, tmp_path, max_upload_bytes=1_000_000, max_inflight_upload_bytes=1_000_000
        )


def test_a_declared_length_is_checked_but_only_received_bytes_are_held() -> None:
    """A slow client that declares a large body and sends little must not pin the budget for
    everyone else (it would make a slow-loris attack cheaper than without a budget)."""
    from app.admission import UploadBudget
    from app.errors import OverloadedError

    budget = UploadBudget(1000)
    with budget.hold() as slow:
        slow.check(900)  # fits: nothing is held yet
        slow.take(10)
        assert budget.held == 10
        with budget.hold() as other:
            other.take(900)
            with pytest.raises(OverloadedError):
                slow.check(900)
            with pytest.raises(OverloadedError):
                slow.take(100)
            assert budget.held == 910
        assert budget.held == 10
    assert budget.held == 0


def test_cors_preflight_allows_the_apis_request_headers(tiny_store, tmp_path) -> None:
    """A browser viewer on an allowed origin may send the key, the patient's age and an
    Idempotency-Key, and read whether an answer was replayed; another origin gets no CORS
    grant."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import make_settings

    settings = make_settings(tiny_store, tmp_path / "data", cors_origins="https://viewer.example")
    with TestClient(create_app(settings)) as client:
        preflight = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key, content-type, x-patient-age, "
            "idempotency-key",
        }
        allowed = client.options(
            "/predict", headers={"Origin": "https://viewer.example", **preflight}
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://viewer.example"
        granted = allowed.headers["access-control-allow-headers"].lower()
        assert {"x-api-key", "content-type", "x-patient-age", "idempotency-key"} <= {
            name.strip() for name in granted.split(",")
        }
        answer = client.get("/healthz", headers={"Origin": "https://viewer.example"})
        exposed = answer.headers["access-control-expose-headers"].lower()
        assert "idempotent-replayed" in {name.strip() for name in exposed.split(",")}
        other = client.options("/predict", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in other.headers
