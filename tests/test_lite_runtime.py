"""The LiteRT runtime: model.tflite exported beside the SavedModel, checked against it at load,
served from a pool of interpreters, and republished for an existing version."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from app.lite_runtime import TFLITE_FILE, parity_probe
from app.model_store import file_sha256, verify_version, write_checksums
from tests.conftest import API_KEY, FIXTURES, make_settings, publish_tiny
from tests.utils.fresh_process import last_line, run_code


def radiographs() -> np.ndarray:
    from app.imaging import load_path

    paths = sorted(FIXTURES.glob("originals/*.jpeg")) + sorted(FIXTURES.glob("chest_xray/*/*"))
    return np.stack([load_path(str(path)) for path in paths])[..., None]


@pytest.fixture(scope="module")
def lite_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pneumonia/1: a tiny version; pneumonia/2: another one whose model.tflite is swapped for
    version 1's (a wrong graph under correct checksums)."""
    store = tmp_path_factory.mktemp("lite-store")
    first = publish_tiny(store / "pneumonia")
    second = publish_tiny(store / "pneumonia", bias=3.0)
    (second / TFLITE_FILE).write_bytes((first / TFLITE_FILE).read_bytes())
    write_checksums(second)
    return store


def test_export_writes_a_checked_tflite(tiny_store: Path) -> None:
    folder = tiny_store / "pneumonia" / "1"
    card = verify_version(folder)  # model.tflite is covered by the checksums
    assert TFLITE_FILE in (folder / "checksums.sha256").read_text()
    section = card["tflite"]
    assert section["file"] == TFLITE_FILE
    assert section["probe_images"] == len(parity_probe())
    assert 0 <= section["max_difference_on_probe"]["probabilities"] <= 1e-4


def test_both_runtimes_give_the_same_probabilities(tiny_store: Path) -> None:
    from app.classifier import load_version

    lite = load_version(tiny_store / "pneumonia", 1)
    reference = load_version(tiny_store / "pneumonia", 1, runtime="savedmodel")
    assert (lite.runtime, reference.runtime) == ("tflite", "savedmodel")
    images = radiographs()
    got, expected = lite.predict(images), reference.predict(images)
    assert got.shape == expected.shape == (len(images), 2)
    assert np.abs(got - expected).max() < 1e-5
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-6)
    # one image at a time (a new batch size each call) gives the batch's answers
    for index in range(len(images)):
        assert np.abs(lite.predict(images[index : index + 1])[0] - got[index]).max() < 1e-6


def test_a_tflite_that_is_not_the_savedmodel_is_not_served(
    lite_store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Version 2's model.tflite is version 1's graph: the SavedModel (the reference) serves it."""
    from app.classifier import ModelManager, load_version

    with caplog.at_level(logging.ERROR, logger="pneumoscan.model"):
        model = load_version(lite_store / "pneumonia", 2)
    assert model.runtime == "savedmodel"
    assert "does not give the answers its card recorded for the SavedModel" in caplog.text
    assert "probabilities differ" in caplog.text
    images = radiographs()
    reference = load_version(lite_store / "pneumonia", 2, runtime="savedmodel").predict(images)
    wrong_graph = load_version(lite_store / "pneumonia", 1).predict(images)
    assert np.abs(reference - wrong_graph).max() > 0.01  # the two graphs really differ
    np.testing.assert_allclose(model.predict(images), reference, atol=1e-6)
    manager = ModelManager(lite_store, "pneumonia", None, 60)
    manager.refresh()
    assert manager.current is not None and manager.current.version == 2
    assert manager.current.runtime == "savedmodel" and manager.failed == {}


def test_export_without_a_faithful_tflite_publishes_the_savedmodel_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training import export

    monkeypatch.setattr(export, "mismatches", lambda *args: ["forced for the test"])
    folder = publish_tiny(tmp_path / "pneumonia")
    card = verify_version(folder)
    assert not (folder / TFLITE_FILE).exists()
    assert card["tflite"]["file"] is None
    assert "forced for the test" in card["tflite"]["not_written"]
    from app.classifier import load_version

    assert load_version(tmp_path / "pneumonia", 1).runtime == "savedmodel"


# A serving install (`pip install .`) has no TensorFlow: it is the `training` extra. In these
# child processes it cannot be imported (None in sys.modules makes `import tensorflow` raise
# ModuleNotFoundError and find_spec answer None), though this venv has it.
WITHOUT_TENSORFLOW = """
import sys
sys.modules["tensorflow"] = sys.modules["keras"] = None
"""


def service_without_tensorflow(store: Path, data: Path, settings: str, body: str) -> str:
    """Code for a child process without TensorFlow that runs `body` (indented) with `client`,
    a TestClient of the app on `store`, made with the extra settings `settings`."""
    return (
        WITHOUT_TENSORFLOW
        + f"""
from pathlib import Path
from fastapi.testclient import TestClient
from app.main import create_app
from tests.conftest import API_KEY, make_settings
settings = make_settings(Path({str(store)!r}), Path({str(data)!r}), {settings})
with TestClient(create_app(settings), headers={{"X-API-Key": API_KEY}}) as client:
{body}"""
    )


def test_a_serving_install_without_tensorflow_predicts_and_explains(
    tiny_store: Path, tmp_path: Path
) -> None:
    """The card records the SavedModel's answers on the probe at export, so a service on
    LiteRT checks the file and answers /predict and /explain without TensorFlow at all (its
    import alone takes seconds and hundreds of MB, and the package 1.3 GB of disk)."""
    body = """
    upload = Path("tests/fixtures/originals/person495_bacteria_2094.jpeg").read_bytes()
    answer = client.post("/predict", files={"file": ("x.jpeg", upload)})
    overlay = client.get(answer.json()["explain_url"] + "?num_samples=100")
    models = client.get("/models").json()
print(answer.status_code, overlay.status_code, overlay.content[:4], models["runtime"])
"""
    code = service_without_tensorflow(tiny_store, tmp_path / "data", "", body)
    assert last_line(code) == "200 200 b'\\x89PNG' tflite"


def test_without_tensorflow_a_savedmodel_only_version_says_what_to_install(
    tiny_store: Path, tmp_path: Path
) -> None:
    body = """
    ready = client.get("/readyz").status_code
    detail = client.get("/models").json()["versions"][0]["detail"]
print(ready, "pip install 'pneumoscan[training]'" in detail)
"""
    code = service_without_tensorflow(
        tiny_store, tmp_path / "data", 'model_runtime="savedmodel"', body
    )
    assert last_line(code) == "503 True"
    training = run_code(
        WITHOUT_TENSORFLOW + "from training.__main__ import main\n"
        "raise SystemExit(main(['evaluate', '--model', 'x', '--data', 'y']))"
    )
    assert training.returncode == 2
    assert "pip install -e '.[training]'" in training.stderr


def test_a_card_without_recorded_answers_is_checked_against_the_savedmodel(
    tiny_store: Path, tmp_path: Path
) -> None:
    """Versions published before the answers were recorded (the shipped v5): the file is
    checked against the SavedModel itself, then served by LiteRT."""
    import shutil

    from app.classifier import load_version

    folder = tmp_path / "pneumonia" / "1"
    shutil.copytree(tiny_store / "pneumonia" / "1", folder)
    card = json.loads((folder / "model.json").read_text())
    del card["tflite"]["probe_reference"]
    (folder / "model.json").write_text(json.dumps(card))
    write_checksums(folder)
    model = load_version(tmp_path / "pneumonia", 1)
    assert model.runtime == "tflite"
    images = radiographs()
    reference = load_version(tmp_path / "pneumonia", 1, runtime="savedmodel").predict(images)
    np.testing.assert_allclose(model.predict(images), reference, atol=1e-5)


def test_concurrent_calls_each_get_their_own_answers(tiny_store: Path) -> None:
    from app.classifier import load_version

    model = load_version(tiny_store / "pneumonia", 1)
    images = np.concatenate([radiographs(), parity_probe()])
    expected = load_version(tiny_store / "pneumonia", 1, runtime="savedmodel").predict(images)
    failures: list[str] = []

    def caller(offset: int) -> None:
        for round_ in range(25):
            size = 1 + (offset + round_) % 5
            rows = [(offset * 3 + round_ + k) % len(images) for k in range(size)]
            got = model.predict(images[rows])
            if np.abs(got - expected[rows]).max() > 1e-5:
                failures.append(f"caller {offset} round {round_}")

    threads = [threading.Thread(target=caller, args=(offset,)) for offset in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_without_litert_the_savedmodel_serves(
    tiny_store: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from app import classifier

    monkeypatch.setattr(classifier, "litert_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="pneumoscan.model"):
        model = classifier.load_version(tiny_store / "pneumonia", 1)
    assert model.runtime == "savedmodel"
    assert "LiteRT (ai-edge-litert) is not installed" in caplog.text


def test_unknown_runtime_is_a_settings_error(tiny_store: Path, tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="model_runtime"):
        make_settings(tiny_store, tmp_path, model_runtime="onnx")


@pytest.mark.parametrize("runtime", ["auto", "savedmodel"])
def test_the_service_reports_its_runtime(tiny_store: Path, tmp_path: Path, runtime: str) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = make_settings(tiny_store, tmp_path / "data", model_runtime=runtime)
    with TestClient(create_app(settings)) as client:
        client.headers["X-API-Key"] = API_KEY
        models = client.get("/models").json()
        upload = (FIXTURES / "originals" / "person495_bacteria_2094.jpeg").read_bytes()
        answer = client.post("/predict", files={"file": ("x.jpeg", upload)})
    assert models["runtime"] == ("tflite" if runtime == "auto" else "savedmodel")
    assert models["card"]["tflite"]["file"] == TFLITE_FILE
    assert answer.status_code == 200


def test_attach_tflite_republishes_the_same_savedmodel(tmp_path: Path) -> None:
    from tests.conftest import build_tiny_model, tiny_card
    from training.__main__ import main
    from training.export import export_version

    model_dir = tmp_path / "store" / "pneumonia"
    model = build_tiny_model(1.0)
    _, source = export_version(model_dir, model, 1.0, tiny_card(0.4), tflite=False)
    assert not (source / TFLITE_FILE).exists()
    store = str(model_dir.parent)
    assert main(["attach-tflite", "--source", str(source), "--model-store", store]) == 0
    target = model_dir / "2"
    new_card = verify_version(target)
    for name in ("saved_model.pb", "fingerprint.pb", "variables/variables.index"):
        assert file_sha256(target / name) == file_sha256(source / name), name
    old_card = json.loads((source / "model.json").read_text())
    added = ("version", "tflite", "derived_from")
    assert {k: v for k, v in new_card.items() if k not in added} == {
        k: v for k, v in old_card.items() if k != "version"
    }
    assert new_card["version"] == 2 and new_card["derived_from"]["version"] == 1
    assert new_card["tflite"]["max_difference_on_probe"]["probabilities"] <= 1e-4

    from app.classifier import load_version

    assert load_version(model_dir, 2).runtime == "tflite"
    assert load_version(model_dir, 1).runtime == "savedmodel"  # nothing to run with LiteRT
    # the source folder is left as it was, and a bad source is one clear line
    assert not (source / TFLITE_FILE).exists()
    with pytest.raises(SystemExit, match=r"error: .*incomplete"):
        main(["attach-tflite", "--source", str(tmp_path), "--model-store", store])


def test_the_runtimes_must_agree_on_probabilities_flags_and_scores_near_the_threshold() -> None:
    from app.lite_runtime import mismatches

    p = np.array([[0.3, 0.7], [0.9, 0.1]], np.float32)
    ood = np.array([0.5, 500.0])  # threshold 1: one typical, one far out
    reference = {"probabilities": p, "ood_score": ood}
    assert mismatches(reference, reference, 1.0) == []
    moved = {"probabilities": p + np.float32(2e-4), "ood_score": ood}
    assert "probabilities differ" in mismatches(moved, reference, 1.0)[0]
    far_off = {"probabilities": p, "ood_score": np.array([0.5, 525.0])}  # 5 %, 500x threshold
    assert mismatches(far_off, reference, 1.0) == []
    near_off = {"probabilities": p, "ood_score": np.array([0.52, 500.0])}  # 2 % near it
    assert "ood_score differs" in mismatches(near_off, reference, 1.0)[0]
    flipped = {"probabilities": p, "ood_score": np.array([0.5, 0.9])}
    assert "flag differs" in " ".join(mismatches(flipped, reference, 1.0))
    assert "missing" in mismatches({"probabilities": p}, reference, 1.0)[0]


@pytest.mark.parametrize("recorded", ["not a table", {"probabilities": [[0.5]]}, {"x": "y"}])
def test_unreadable_recorded_answers_fall_back_to_the_savedmodel(
    tiny_store: Path, tmp_path: Path, recorded: object
) -> None:
    import shutil

    from app.classifier import load_version

    folder = tmp_path / "pneumonia" / "1"
    shutil.copytree(tiny_store / "pneumonia" / "1", folder)
    card = json.loads((folder / "model.json").read_text())
    card["tflite"]["probe_reference"] = recorded
    (folder / "model.json").write_text(json.dumps(card))
    write_checksums(folder)
    assert load_version(tmp_path / "pneumonia", 1).runtime == "savedmodel"


def test_litert_notice_is_kept_out_of_stderr(tiny_store: Path) -> None:
    """LiteRT prints an `INFO:` line on stderr at a process's first model call, which no setting
    silences: in a JSON log it would be the one line a log shipper cannot parse."""
    tflite = tiny_store / "pneumonia" / "1" / TFLITE_FILE
    done = run_code(
        "import logging, sys\n"
        "import numpy as np\n"
        "from pathlib import Path\n"
        "from app.lite_runtime import LiteEngine\n"
        "logging.basicConfig(level=logging.DEBUG, stream=sys.stdout)\n"
        f"engines = [LiteEngine(Path({str(tflite)!r}), 1) for _ in range(2)]\n"
        "for engine in engines:\n"
        "    engine(np.zeros((2, 224, 224, 1), np.uint8))\n"
        "print('called')\n"
    )
    assert done.returncode == 0, done.stderr
    assert "XNNPACK" not in done.stderr
    assert done.stdout.count("LiteRT: INFO: Created TensorFlow Lite XNNPACK delegate") == 1
    assert done.stdout.strip().endswith("called")


def test_other_output_of_the_first_call_still_reaches_stderr(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import os

    from app import lite_runtime

    monkeypatch.setattr(lite_runtime, "_first_call_done", False)

    def failing_runner(pixels: np.ndarray) -> None:
        os.write(2, lite_runtime.XNNPACK_NOTICE + b"\nERROR: a real LiteRT problem\n")
        raise RuntimeError("invoke failed")

    with pytest.raises(RuntimeError, match="invoke failed"):
        lite_runtime._first_call_with_stderr_captured(failing_runner)
    assert capfd.readouterr().err == "ERROR: a real LiteRT problem\n"
    os.write(2, b"after\n")  # file descriptor 2 is restored
    assert capfd.readouterr().err == "after\n"
