"""`pneumoscan check`: for each of a site's files, the answer the API gives it (short of the
model), with the service's settings, before anything is sent."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.conformance import main
from tests.conftest import FIXTURES, fixture_bytes
from tests.utils.dicom_factory import make_dicom


def gray() -> np.ndarray:
    return np.asarray(
        Image.open(FIXTURES / "chest_xray" / "NORMAL" / "NORMAL2-IM-0744-0001.jpeg").convert("L")
    )


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


SAMPLES = {
    "radiograph.jpeg": lambda: fixture_bytes("originals/NORMAL2-IM-0744-0001.jpeg"),
    "child.dcm": lambda: make_dicom(gray(), bits=12, attributes={"PatientAge": "003Y"}),
    "adult.dcm": lambda: make_dicom(gray(), bits=12, attributes={"PatientAge": "045Y"}),
    "lateral.dcm": lambda: make_dicom(gray(), attributes={"ViewPosition": "LL"}),
    "ct.dcm": lambda: make_dicom(gray(), modality="CT"),
    "thresholded.png": lambda: png(Image.fromarray(gray()).convert("1")),
    "blank.png": lambda: png(Image.new("L", (300, 300), 128)),
    "notes.txt": lambda: b"not an image",
    "private-class.dcm": lambda: make_dicom(gray(), attributes={"SOPClassUID": "1.2.3.4.5"}),
}


@pytest.fixture
def export(tmp_path: Path) -> Path:
    folder = tmp_path / ".cache" / "export"  # under a hidden folder: its own files still count
    (folder / "series").mkdir(parents=True)
    for name, make in SAMPLES.items():
        (folder / "series" / name).write_bytes(make())
    (folder / ".DS_Store").write_bytes(b"hidden")  # skipped
    return folder


def test_each_file_gets_the_answer_the_api_gives_it(client, export: Path, capsys) -> None:
    """The check and the API agree file by file: the same status and error code."""
    assert main([str(export), "--json"]) == 1  # some would be refused
    captured = capsys.readouterr()
    checked = {Path(r["path"]).name: r for r in map(json.loads, captured.out.splitlines())}
    assert set(checked) == set(SAMPLES)
    for name, result in checked.items():
        answer = client.post("/predict", files={"file": (name, SAMPLES[name]())})
        assert answer.status_code == result["status"], name
        if answer.status_code == 200:
            assert answer.json()["age_check"]["status"] == result["age_check"], name
        else:
            assert answer.json()["error"]["code"] == result["code"], name
    assert checked["adult.dcm"]["age_check"] == "outside"
    assert checked["child.dcm"]["sr"] == "possible"
    assert checked["private-class.dcm"]["sr"].startswith("422 unsupported_dicom")
    assert "9 files: 4 scored, 2 unsupported_dicom" in captured.err
    # no patient attribute is printed: only verdicts
    assert "045Y" not in captured.out and "Doe^Jane" not in captured.out


def test_a_clean_export_exits_0_with_one_line_per_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "a.jpeg").write_bytes(SAMPLES["radiograph.jpeg"]())
    (tmp_path / "b.dcm").write_bytes(SAMPLES["child.dcm"]())
    assert main([str(tmp_path / "a.jpeg"), str(tmp_path / "b.dcm")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{tmp_path / 'a.jpeg'}: scored (JPEG 1416x1296, age unknown)",
        f"{tmp_path / 'b.dcm'}: scored (DICOM 224x224, age within, SR possible)",
    ]


def test_the_services_settings_apply(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "adult.dcm").write_bytes(SAMPLES["adult.dcm"]())
    monkeypatch.setenv("PNEUMOSCAN_AGE_OUTSIDE", "refuse")
    assert main([str(tmp_path)]) == 1
    assert "422 age_outside_training" in capsys.readouterr().out
    monkeypatch.setenv("PNEUMOSCAN_TRAINED_AGE_YEARS", "18-99")
    assert main([str(tmp_path)]) == 0
    assert "age within" in capsys.readouterr().out
    monkeypatch.setenv("PNEUMOSCAN_TRAINED_AGE_YEARS", "adults")
    assert main([str(tmp_path)]) == 2
    assert "invalid settings: trained_age_years: Value error" in capsys.readouterr().err
    monkeypatch.delenv("PNEUMOSCAN_TRAINED_AGE_YEARS")
    assert main([str(tmp_path / "nothing-here")]) == 1  # unreadable path: counted, not a crash
