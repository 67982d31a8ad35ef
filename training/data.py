"""Reading a Kaggle-layout folder, naming patients, and the seeded patient-level split."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.errors import InputError
from app.imaging import load_path

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm"}
_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_IM = re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE)


class DataError(Exception):
    """The data folder is not usable; the message says what to fix."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # index into CLASS_NAMES

    @property
    def patient(self) -> str:
        return patient_id(self.path.name)


def patient_id(file_name: str) -> str:
    """Patient of a Kermany/Mooney file name (several images can share one patient)."""
    stem = Path(file_name).stem
    for pattern in (_PERSON, _IM):
        match = pattern.match(stem)
        if match:
            return match.group(1)
    return stem


def class_folder(root: Path, split: str | None) -> Path:
    base = root / split if split and (root / split).is_dir() else root
    missing = [name for name in CLASS_NAMES if not (base / name).is_dir()]
    if missing:
        raise DataError(
            f"{base} must hold the class folders {', '.join(CLASS_NAMES)}; missing: "
            f"{', '.join(missing)}."
        )
    return base


def scan(root: Path | str, split: str | None = "train") -> list[Sample]:
    """List the images of `<root>/<split>/{NORMAL,PNEUMONIA}` (or `<root>/{NORMAL,PNEUMONIA}`)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Data folder {root} does not exist.")
    base = class_folder(root, split)
    samples = [
        Sample(path, label)
        for label, name in enumerate(CLASS_NAMES)
        for path in sorted((base / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    for name in CLASS_NAMES:
        if not any(CLASS_NAMES[s.label] == name for s in samples):
            raise DataError(f"{base / name} holds no images (.jpeg, .jpg, .png, .dcm).")
    return samples


def patient_split(
    samples: list[Sample], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 42
) -> dict[str, list[Sample]]:
    """Seeded split by patient, stratified by class: no patient crosses two parts."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[Sample]] = {"train": [], "validation": [], "internal_test": []}
    for label in range(len(CLASS_NAMES)):
        by_patient: dict[str, list[Sample]] = {}
        for sample in samples:
            if sample.label == label:
                by_patient.setdefault(sample.patient, []).append(sample)
        patients = sorted(by_patient)
        rng.shuffle(patients)
        n = len(patients)
        if n < 3:
            raise DataError(
                f"{CLASS_NAMES[label]} has {n} patient(s); a train/validation/test split by "
                "patient needs at least 3."
            )
        n_train = round(fractions[0] * n)
        n_val = max(1, round(fractions[1] * n))
        n_train = min(n_train, n - n_val - 1)  # keep at least one patient for internal test
        cuts = {
            "train": patients[:n_train],
            "validation": patients[n_train : n_train + n_val],
            "internal_test": patients[n_train + n_val :],
        }
        for part, chosen in cuts.items():
            for patient in chosen:
                parts[part].extend(by_patient[patient])
    for part in parts.values():
        part.sort(key=lambda s: (s.label, s.path.name))
    return parts


def manifest(parts: dict[str, list[Sample]]) -> dict[str, object]:
    """File lists per part and one sha256 over them, for the model card."""
    lists = {
        part: [f"{CLASS_NAMES[s.label]}/{s.path.name}" for s in samples]
        for part, samples in parts.items()
    }
    digest = hashlib.sha256(json.dumps(lists, sort_keys=True).encode()).hexdigest()
    counts = {
        part: {
            name: sum(1 for s in samples if CLASS_NAMES[s.label] == name) for name in CLASS_NAMES
        }
        for part, samples in parts.items()
    }
    return {"sha256": digest, "counts": counts, "files": lists}


def load_arrays(samples: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """Decode through the service's preprocessing: uint8 (N, 224, 224, 1) and int labels."""
    images = np.empty((len(samples), 224, 224, 1), dtype=np.uint8)
    for index, sample in enumerate(samples):
        try:
            images[index, :, :, 0] = load_path(str(sample.path))
        except InputError as exc:
            raise DataError(f"Cannot read {sample.path}: {exc.message}") from exc
        except OSError as exc:
            raise DataError(f"Cannot read {sample.path}: {exc}") from exc
    labels = np.array([s.label for s in samples], dtype=np.int32)
    return images, labels
