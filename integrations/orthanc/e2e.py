"""End to end against a real Orthanc: DICOM radiographs stored into Orthanc come back scored, as a
Comprehensive 3D SR in the same study and a `PneumoscanResult` study metadata entry.

    python -m integrations.orthanc.e2e [--timeout 120]

Starts pneumoscan (shipped model store) and Orthanc with the plugin, both on loopback in temp
folders, stores four radiographs made from the shared originals (MONOCHROME2 8-bit, MONOCHROME1
12-bit with a VOI LUT, JPEG 2000, RLE), waits for each SR, checks its label and model version,
and stops both processes. Then one study of five images, sent in this order: a PA that the
model calls PNEUMONIA, a repeat PA it calls NORMAL, an AP whose BodyPartExamined is TORAX, a
lateral, and an image labelled HAND: the lateral and the hand must not be scored, each frontal
chest image must get its own SR and result, and the study must read PNEUMONIA; the PNEUMONIA
PA's explanation overlay must be a Secondary Capture in that study. One radiograph stored with
DICOMweb STOW-RS must come back, by QIDO-RS, with its SR and overlay series. Last,
kill -9: Orthanc is restarted with the service unreachable, an image is stored, Orthanc is
killed while the plugin retries it and started again, and the image must then be scored once,
with no earlier image scored again.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from app.imaging import to_grayscale_u8
from benchmarks.common import BENCH_KEY, FIXTURES, default_store, free_port, running_server
from tests.utils.dicom_factory import make_dicom

PLUGIN = Path(__file__).resolve().parent / "pneumoscan_plugin.py"
PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
RIS_KEY = "e2e-ris-reader-key-0123456789"  # PNEUMOSCAN_READER_KEYS of the service


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc")


# The age check each case's study should read (the others state no age).
EXPECTED_AGE_CHECK = {"monochrome2-8bit": "within", "rle": "outside"}


def cases() -> list[tuple[str, bytes]]:
    def gray(name: str) -> np.ndarray:
        image = Image.open(FIXTURES / "originals" / name)
        return np.asarray(to_grayscale_u8(image))

    normal = gray("NORMAL2-IM-0744-0001.jpeg")
    pneumonia = gray("person495_bacteria_2094.jpeg")
    return [
        # a child, as the model's training cohort, and an adult, whom it never saw
        ("monochrome2-8bit", make_dicom(normal, attributes={"PatientAge": "003Y"})),
        (
            "monochrome1-12bit-voi",
            make_dicom(pneumonia, bits=12, photometric="MONOCHROME1", voi_lut=True),
        ),
        ("jpeg2000", make_dicom(gray("NORMAL2-IM-0746-0001.jpeg"), syntax=JPEG2000Lossless)),
        (
            "rle",
            make_dicom(
                gray("person1133_virus_1865.jpeg"),
                syntax=RLELossless,
                attributes={"PatientBirthDate": "19700101", "StudyDate": "20251203"},
            ),
        ),
    ]


def multi_image_study() -> list[tuple[str, bytes]]:
    """PA (pneumonia), repeat PA (normal), an AP whose body part is written TORAX (sent: only
    other body parts are left out), a lateral and an image labelled HAND (neither sent), in one
    study, in the order sent."""
    study_uid = generate_uid()
    images = [
        ("pa", "person495_bacteria_2094.jpeg", "PA", "CHEST"),
        ("repeat", "NORMAL2-IM-0744-0001.jpeg", "PA", "CHEST"),
        ("torax", "person1133_virus_1865.jpeg", "AP", "TORAX"),
        ("lateral", "NORMAL2-IM-0746-0001.jpeg", "LL", "CHEST"),
        ("hand", "NORMAL2-IM-0746-0001.jpeg", "PA", "HAND"),
    ]
    out = []
    for name, original, view, body_part in images:
        gray = np.asarray(to_grayscale_u8(Image.open(FIXTURES / "originals" / original)))
        ds = pydicom.dcmread(io.BytesIO(make_dicom(gray)))
        ds.StudyInstanceUID, ds.ViewPosition = study_uid, view
        ds.BodyPartExamined = body_part
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append((name, buffer.getvalue()))
    return out


def check_ris_reading(service: str, base: str, study: str) -> bool:
    """The RIS reports the signed report's finding by the study's UID, with a reader key of its
    own: the read reaches each image the plugin scored (PA, repeat PA, AP), not the lateral."""
    study_uid = httpx.get(f"{base}/studies/{study}", timeout=5).json()["MainDicomTags"][
        "StudyInstanceUID"
    ]
    answer = httpx.put(
        f"{service}/studies/{study_uid}/reading",
        json={"label": "PNEUMONIA"},
        headers={"X-API-Key": RIS_KEY},
        timeout=10,
    )
    readings = answer.json().get("readings", []) if answer.status_code == 200 else []
    refused = httpx.post(
        f"{service}/predict", content=b"x", headers={"X-API-Key": RIS_KEY}, timeout=10
    ).status_code
    ok = (
        len(readings) == 3
        and {r["reader_label"] for r in readings} == {"PNEUMONIA"}
        and refused == 403
    )
    print(
        f"{'ok' if ok else 'FAIL'} RIS read of the study by its UID (reader key): HTTP "
        f"{answer.status_code}, {len(readings)} images read, /predict with it: {refused}"
    )
    return ok


def check_multi_image_study(base: str, timeout: float, service: str) -> bool:
    ids = {}
    for name, data in multi_image_study():
        response = httpx.post(f"{base}/instances", content=data, timeout=30)
        response.raise_for_status()
        ids[name] = response.json()
    study = ids["pa"]["ParentStudy"]

    def instance_result(name: str) -> str | None:
        url = f"{base}/instances/{ids[name]['ID']}/metadata/PneumoscanResult"
        answer = httpx.get(url, timeout=5)
        return answer.text if answer.status_code == 200 else None

    deadline = time.monotonic() + timeout
    scored = ("pa", "repeat", "torax")
    while time.monotonic() < deadline and not all(instance_result(name) for name in scored):
        time.sleep(0.5)
    time.sleep(2)  # the lateral and the hand came last: give a wrongly scored one time to show
    results = {name: instance_result(name) for name in ids}
    study_result = httpx.get(f"{base}/studies/{study}/metadata/PneumoscanResult", timeout=5).text
    srs = sr_count(base, study)
    ok = (
        results["pa"] == "PNEUMONIA"
        and results["repeat"] == "NORMAL"
        and results["torax"] in ("NORMAL", "PNEUMONIA")
        and results["lateral"] is None
        and results["hand"] is None
        and study_result == "PNEUMONIA"
        and srs == 3
    )
    print(
        f"{'ok' if ok else 'FAIL'} study of PA + repeat PA + AP (TORAX) + lateral + HAND: "
        f"instances {results}, study {study_result}, {srs} SR instances"
    )
    ok = check_ris_reading(service, base, study) and ok
    return check_overlays(base, study, {name: ids[name]["ID"] for name in ids}, deadline) and ok


def check_overlays(base: str, study: str, ids: dict[str, str], deadline: float) -> bool:
    """The PNEUMONIA call's explanation overlay is a Secondary Capture in a new series of the
    same study (the plugin's default, PNEUMOSCAN_OVERLAYS=pneumonia), long side 512 px at the
    image's proportions; the NORMAL call has none."""

    def overlay(name: str) -> str | None:
        """The entry once the overlay is made (it reads "pending: <id>" while it is)."""
        answer = httpx.get(f"{base}/instances/{ids[name]}/metadata/PneumoscanOverlay", timeout=5)
        done = answer.status_code == 200 and not answer.text.startswith("pending")
        return answer.text if done else None

    while time.monotonic() < deadline and overlay("pa") is None:
        time.sleep(0.5)
    created = overlay("pa")
    problems = []
    if created is None or created.startswith("error"):
        problems.append(f"PA overlay: {created!r}")
    else:
        tags = httpx.get(f"{base}/instances/{created}/simplified-tags", timeout=5).json()
        parent = httpx.get(f"{base}/instances/{created}/study", timeout=5).json()["ID"]
        preview = httpx.get(f"{base}/instances/{created}/preview", timeout=10)
        if parent != study or tags.get("Modality") != "OT":
            problems.append(f"overlay in study {parent}, modality {tags.get('Modality')}")
        if "NOT FOR DIAGNOSTIC USE" not in tags.get("SeriesDescription", ""):
            problems.append(f"overlay series {tags.get('SeriesDescription')!r}")
        source = httpx.get(f"{base}/instances/{ids['pa']}/simplified-tags", timeout=5).json()
        shape = (int(tags.get("Columns", 0)), int(tags.get("Rows", 0)))
        aspect = int(source["Columns"]) / int(source["Rows"])
        if (
            preview.status_code != 200
            or max(shape) != 512
            or abs(shape[0] / shape[1] - aspect) > 0.01 * aspect
        ):
            problems.append(
                f"overlay preview {preview.status_code}, {shape} for a {aspect:.2f} image"
            )
    repeat = httpx.get(f"{base}/instances/{ids['repeat']}/metadata/PneumoscanOverlay", timeout=5)
    if repeat.status_code != 404:  # not even a pending entry
        problems.append(f"the NORMAL repeat got an overlay entry: {repeat.text!r}")
    print(
        f"{'FAIL' if problems else 'ok'} overlay of the PNEUMONIA call stored as a Secondary "
        f"Capture in the study{': ' + '; '.join(problems) if problems else ''}"
    )
    return not problems


def check_dicomweb(base: str, timeout: float, service: str) -> bool:
    """A PACS or router that speaks DICOMweb stores with STOW-RS and finds the result with
    QIDO-RS: the SR series and, for a PNEUMONIA call, the overlay series, in the same study.
    The RIS reports this study's read before the image reaches the PACS (the gateway's backlog
    after an outage): held (202), and recorded for the image once the plugin has scored it."""
    if not DICOMWEB_PLUGIN.exists():
        print("SKIPPED DICOMweb: the orthanc-dicomweb plugin is not installed")
        return True
    gray = np.asarray(
        to_grayscale_u8(Image.open(FIXTURES / "originals" / "person495_bacteria_2094.jpeg"))
    )
    data = make_dicom(gray)
    study_uid = pydicom.dcmread(io.BytesIO(data)).StudyInstanceUID
    ris = {"X-API-Key": RIS_KEY}
    early = httpx.put(
        f"{service}/studies/{study_uid}/reading",
        json={"label": "PNEUMONIA"},
        headers=ris,
        timeout=10,
    ).status_code
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    stored = httpx.post(
        f"{base}/dicom-web/studies",
        content=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
        timeout=30,
    )
    modalities: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while (
        stored.is_success
        and time.monotonic() < deadline
        and set(modalities.values())
        != {
            "DX",
            "SR",
            "OT",
        }
    ):
        time.sleep(0.5)
        found = httpx.get(f"{base}/dicom-web/studies/{study_uid}/series", timeout=5)
        if found.status_code == 200:
            modalities = {
                series["0020000E"]["Value"][0]: series["00080060"]["Value"][0]
                for series in found.json()
            }
    ok = stored.is_success and sorted(modalities.values()) == ["DX", "OT", "SR"]
    print(
        f"{'ok' if ok else 'FAIL'} DICOMweb: STOW-RS {stored.status_code}, QIDO-RS finds the "
        f"study's series {sorted(modalities.values())} (image, overlay, SR)"
    )
    listed = httpx.get(f"{service}/studies/{study_uid}/predictions", headers=ris, timeout=10)
    predictions = listed.json().get("predictions", []) if listed.status_code == 200 else []
    reads = [(p.get("reading") or {}).get("reader_label") for p in predictions]
    held_ok = early == 202 and reads == ["PNEUMONIA"]
    print(
        f"{'ok' if held_ok else 'FAIL'} RIS read reported before the image was stored: HTTP "
        f"{early}, then the scored image's read {reads}"
    )
    return ok and held_ok


class Orthanc:
    """One Orthanc process at a time on the same storage, started, killed and restarted."""

    def __init__(self, binary: str, config_path: Path, log_path: Path, base: str) -> None:
        self.binary, self.config_path, self.log_path, self.base = (
            binary,
            config_path,
            log_path,
            base,
        )
        self.process: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own binary and config
                [self.binary, str(self.config_path)], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/system", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("Orthanc did not start:\n" + self.log_path.read_text()[-3000:])

    def kill(self) -> None:
        """kill -9: no shutdown, whatever the plugin was doing stops there."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def sr_count(base: str, study: str) -> int:
    instances = httpx.get(f"{base}/studies/{study}/instances", timeout=5).json()
    return sum(
        httpx.get(f"{base}/instances/{i['ID']}/content/0008,0060", timeout=5).text.strip() == "SR"
        for i in instances
    )


def check_scored_after_kill(
    orthanc: Orthanc, env: dict[str, str], first_study: str, timeout: float
) -> bool:
    """An image stored while the service is unreachable, with Orthanc killed (-9) while the
    plugin retries it, is scored once Orthanc restarts; images finished before are not re-sent."""
    base, before = orthanc.base, sr_count(orthanc.base, first_study)
    orthanc.kill()
    unreachable = f"http://127.0.0.1:{free_port()}"
    orthanc.start({**env, "PNEUMOSCAN_URL": unreachable})
    gray = np.asarray(
        to_grayscale_u8(Image.open(FIXTURES / "originals" / "person1133_virus_1865.jpeg"))
    )
    stored = httpx.post(f"{base}/instances", content=make_dicom(gray), timeout=30).json()
    instance, study = stored["ID"], stored["ParentStudy"]
    deadline = time.monotonic() + 30
    while f"retrying instance {instance}" not in orthanc.log_path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            print("FAIL kill -9 while retrying: the plugin never tried the instance")
            return False
        time.sleep(0.3)
    orthanc.kill()
    orthanc.start(env)
    url = f"{base}/instances/{instance}/metadata/PneumoscanResult"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and httpx.get(url, timeout=5).status_code != 200:
        time.sleep(0.5)
    time.sleep(2)  # time for a wrongly repeated SR to show up
    answer = httpx.get(url, timeout=5)
    label = answer.text if answer.status_code == 200 else None
    after, srs = sr_count(base, first_study), sr_count(base, study)
    ok = label in ("NORMAL", "PNEUMONIA") and srs == 1 and after == before
    print(
        f"{'ok' if ok else 'FAIL'} kill -9 while the plugin retried an instance: after the "
        f"restart {label}, {srs} SR; an earlier study's SRs {before} -> {after}"
    )
    return ok


def modality_count(base: str, study: str, modality: str) -> int:
    instances = httpx.get(f"{base}/studies/{study}/instances", timeout=5).json()
    return sum(
        httpx.get(f"{base}/instances/{i['ID']}/content/0008,0060", timeout=5).text.strip()
        == modality
        for i in instances
    )


def check_overlay_after_kill(orthanc: Orthanc, env: dict[str, str], timeout: float) -> bool:
    """Orthanc killed (-9) while the plugin fetches a PNEUMONIA call's overlay: after the
    restart the overlay is made, once, and the image is not scored again. A service of its own
    draws overlays with 5000 LIME samples, so the fetch lasts seconds and the kill lands in it."""
    base = orthanc.base
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_server(
            default_store(),
            Path(tmp) / "data",
            extra_env={"PNEUMOSCAN_EXPLAIN_NUM_SAMPLES": "5000"},
        ) as slow,
    ):
        slow_env = {**env, "PNEUMOSCAN_URL": slow["url"]}
        orthanc.kill()
        orthanc.start(slow_env)
        gray = np.asarray(
            to_grayscale_u8(Image.open(FIXTURES / "originals" / "person495_bacteria_2094.jpeg"))
        )
        stored = httpx.post(f"{base}/instances", content=make_dicom(gray), timeout=30).json()
        instance, study = stored["ID"], stored["ParentStudy"]
        entry = f"{base}/instances/{instance}/metadata/PneumoscanOverlay"

        def overlay_entry() -> str | None:
            answer = httpx.get(entry, timeout=5)
            return answer.text if answer.status_code == 200 else None

        deadline = time.monotonic() + timeout
        while True:
            seen = overlay_entry()  # read once: the entry appears between two reads
            if seen is not None and seen.startswith("pending"):
                break
            if seen is not None or time.monotonic() > deadline:
                print(f"FAIL kill -9 during an overlay: never seen pending ({seen!r})")
                return False
            time.sleep(0.1)
        orthanc.kill()
        log_before = orthanc.log_path.read_text(errors="replace")
        orthanc.start(slow_env)
        while (overlay_entry() or "pending").startswith("pending"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        created = overlay_entry()
        time.sleep(2)  # time for a wrongly repeated score or overlay to show up
        after_restart = orthanc.log_path.read_text(errors="replace")[len(log_before) :]
        resumed = any(  # the kill lands in the fetch; in the milliseconds after it, the other
            line in after_restart
            for line in (
                "fetching the overlay a restart interrupted",
                "recording the overlay stored just before a restart",
            )
        )
        overlays, srs = modality_count(base, study, "OT"), modality_count(base, study, "SR")
        orthanc.kill()
    orthanc.start(env)
    ok = (
        created is not None
        and not created.startswith(("pending", "error"))
        and resumed
        and overlays == 1
        and srs == 1
    )
    print(
        f"{'ok' if ok else 'FAIL'} kill -9 while the plugin fetched an overlay: after the restart "
        f"{'resumed' if resumed else 'not resumed'}, entry {created!r}, {overlays} overlay, "
        f"{srs} SR"
    )
    return ok


# Loaded by Orthanc instead of the plugin for one check: the plugin, plus an OnStoredInstance
# callback that holds the plugin's thread for a while once an SR is stored (Orthanc calls it in
# the storing thread, after the instance is in its database), so that a kill lands between the
# SR's store and the recording of its call.
HOLD_SR_SCRIPT = """
import importlib.util, sys, time
import orthanc
spec = importlib.util.spec_from_file_location("pneumoscan_plugin", {plugin!r})
plugin = importlib.util.module_from_spec(spec)
sys.modules["pneumoscan_plugin"] = plugin
spec.loader.exec_module(plugin)

def hold(dicom, instance_id):
    if '"Modality" : "SR"' in dicom.GetInstanceSimplifiedJson().replace('": "', '" : "'):
        orthanc.LogWarning("e2e: SR stored, holding the plugin before it records the call")
        time.sleep(60)

orthanc.RegisterOnStoredInstanceCallback(hold)
"""


def check_recorded_after_kill_past_the_sr(
    orthanc: Orthanc, env: dict[str, str], timeout: float, service: str
) -> bool:
    """Orthanc killed (-9) after the plugin stored an image's SR and before it recorded the
    call: after the restart the call is recorded from that SR, the image is not sent again and
    the study holds one SR (before round 21: scored again, two SRs)."""
    base, config_path = orthanc.base, orthanc.config_path
    config = json.loads(config_path.read_text())
    script = config_path.with_name("hold_sr.py")
    script.write_text(HOLD_SR_SCRIPT.format(plugin=str(PLUGIN)))
    orthanc.kill()
    config_path.write_text(json.dumps({**config, "PythonScript": str(script)}))
    try:
        orthanc.start(env)
    finally:
        config_path.write_text(json.dumps(config))  # the next start loads the plugin alone
    gray = np.asarray(
        to_grayscale_u8(Image.open(FIXTURES / "originals" / "person1133_virus_1865.jpeg"))
    )
    data = make_dicom(gray)
    study_uid = pydicom.dcmread(io.BytesIO(data)).StudyInstanceUID
    stored = httpx.post(f"{base}/instances", content=data, timeout=30).json()
    instance, study = stored["ID"], stored["ParentStudy"]
    deadline = time.monotonic() + timeout
    while "holding the plugin" not in orthanc.log_path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            print("FAIL kill -9 after the SR was stored: the plugin never stored one")
            return False
        time.sleep(0.2)
    orthanc.kill()
    log_before = orthanc.log_path.read_text(errors="replace")
    orthanc.start(env)
    url = f"{base}/instances/{instance}/metadata/PneumoscanResult"
    while time.monotonic() < deadline and httpx.get(url, timeout=5).status_code != 200:
        time.sleep(0.5)
    time.sleep(2)  # time for a wrongly repeated score to show up
    answer = httpx.get(url, timeout=5)
    label = answer.text if answer.status_code == 200 else None
    resumed = (
        "recording the call whose SR was stored before a restart"
        in (orthanc.log_path.read_text(errors="replace")[len(log_before) :])
    )
    srs = modality_count(base, study, "SR")
    listed = httpx.get(
        f"{service}/studies/{study_uid}/predictions", headers={"X-API-Key": RIS_KEY}, timeout=10
    )
    sent = len(listed.json().get("predictions", [])) if listed.status_code == 200 else 0
    ok = label in ("NORMAL", "PNEUMONIA") and resumed and srs == 1 and sent == 1
    print(
        f"{'ok' if ok else 'FAIL'} kill -9 after the plugin stored an SR, before it recorded the "
        f"call: after the restart {label}, {'recorded from the SR' if resumed else 'not resumed'}"
        f", {srs} SR, image sent {sent} time(s)"
    )
    return ok


def run(timeout: float) -> bool:
    binary = orthanc_binary()
    if not binary or not PYTHON_PLUGIN.exists():
        print(
            "SKIPPED: Orthanc or its Python plugin is not installed "
            "(apt-get install orthanc orthanc-python)"
        )
        return True
    ok = True
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_server(
            default_store(), Path(tmp) / "data", extra_env={"PNEUMOSCAN_READER_KEYS": RIS_KEY}
        ) as server,
    ):
        http_port, dicom_port = free_port(), free_port()
        config = {
            "Name": "pneumoscan-e2e",
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageDirectory": f"{tmp}/orthanc",
            "IndexDirectory": f"{tmp}/orthanc",
            "Plugins": [str(PYTHON_PLUGIN)]
            + ([str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else []),
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "PythonScript": str(PLUGIN),
            "UserMetadata": {
                "PneumoscanResult": 4200,
                "PneumoscanInputCheck": 4201,
                "PneumoscanOverlay": 4202,
                "PneumoscanAgeCheck": 4203,
            },
            "StableAge": 2,
        }
        config_path = Path(tmp) / "orthanc.json"
        config_path.write_text(json.dumps(config))
        env = {**os.environ, "PNEUMOSCAN_URL": server["url"], "PNEUMOSCAN_API_KEY": BENCH_KEY}
        base = f"http://127.0.0.1:{http_port}"
        orthanc = Orthanc(binary, config_path, Path(tmp) / "orthanc.log", base)
        log_path = orthanc.log_path
        try:
            orthanc.start(env)
            stored = {}
            for name, data in cases():
                response = httpx.post(f"{base}/instances", content=data, timeout=30)
                response.raise_for_status()
                stored[name] = (response.json()["ParentStudy"], data)
            results = {}
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and len(results) < len(stored):
                for name, (study, _) in stored.items():
                    if name in results:
                        continue
                    meta = httpx.get(f"{base}/studies/{study}/metadata/PneumoscanResult", timeout=5)
                    if meta.status_code != 200:
                        continue
                    instances = httpx.get(f"{base}/studies/{study}/instances", timeout=5).json()
                    srs = [
                        i
                        for i in instances
                        if i["MainDicomTags"].get("SOPInstanceUID")
                        and httpx.get(
                            f"{base}/instances/{i['ID']}/content/0008,0060", timeout=5
                        ).text.strip()
                        == "SR"
                    ]
                    check, age = (
                        httpx.get(f"{base}/studies/{study}/metadata/{entry}", timeout=5)
                        for entry in ("PneumoscanInputCheck", "PneumoscanAgeCheck")
                    )
                    results[name] = (
                        meta.text,
                        srs,
                        check.text if check.status_code == 200 else None,
                        age.text if age.status_code == 200 else None,
                    )
                time.sleep(0.5)
            expected_version = httpx.get(f"{server['url']}/readyz").json()["model"]["version"]
            for name, (_study, data) in stored.items():
                if name not in results:
                    print(f"FAIL {name}: no result within {timeout:.0f} s")
                    ok = False
                    continue
                label, srs, input_check, age_check = results[name]
                if label not in ("NORMAL", "PNEUMONIA") or len(srs) != 1:
                    print(f"FAIL {name}: metadata {label!r}, {len(srs)} SR instances")
                    ok = False
                    continue
                sr_bytes = httpx.get(f"{base}/instances/{srs[0]['ID']}/file", timeout=10).content
                sr = pydicom.dcmread(io.BytesIO(sr_bytes))
                source = pydicom.dcmread(io.BytesIO(data))
                direct = httpx.post(
                    f"{server['url']}/predict",
                    files={"file": ("x.dcm", data)},
                    headers={"X-API-Key": BENCH_KEY},
                    timeout=30,
                ).json()
                model = sr.ContributingEquipmentSequence[0].ManufacturerModelName
                ood = direct.get("out_of_distribution")
                expected_check = (
                    None if ood is None else ("flagged" if ood["flagged"] else "typical")
                )
                checks = [
                    sr.StudyInstanceUID == source.StudyInstanceUID,
                    sr.VerificationFlag == "UNVERIFIED",
                    model.endswith(f"v{expected_version}"),
                    direct["label"] == label,
                    input_check == expected_check,
                    age_check
                    == direct["age_check"]["status"]
                    == EXPECTED_AGE_CHECK.get(name, "unknown"),
                ]
                status = "ok" if all(checks) else "FAIL"
                ok = ok and all(checks)
                print(
                    f"{status} {name}: {label} "
                    f"(P(pneumonia) {direct['probabilities']['PNEUMONIA']:.3f}), "
                    f"SR {sr.SOPInstanceUID[-12:]} in study, model {model}, input {input_check}, "
                    f"age {age_check}"
                )
            ok = check_multi_image_study(base, timeout, server["url"]) and ok
            ok = check_dicomweb(base, timeout, server["url"]) and ok
            first_study = stored["monochrome2-8bit"][0]
            ok = check_scored_after_kill(orthanc, env, first_study, timeout) and ok
            ok = check_overlay_after_kill(orthanc, env, timeout) and ok
            ok = check_recorded_after_kill_past_the_sr(orthanc, env, timeout, server["url"]) and ok
        finally:
            orthanc.stop()
            if not ok:
                print(log_path.read_text()[-3000:])
    print("orthanc e2e:", "PASSED" if ok else "FAILED")
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--timeout", type=float, default=120.0)
    sys.exit(0 if run(parser.parse_args().timeout) else 1)
