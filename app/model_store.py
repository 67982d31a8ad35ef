"""The versioned model store, TensorFlow Serving's layout: `<store>/<name>/<int version>/`.

Only integer-named folders are versions; a version is published by writing a hidden temporary
folder and renaming it into place, so a reader never sees half a version. Each version holds a
SavedModel, `model.json` (its input contract and card) and `checksums.sha256` over every file.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from app.errors import ModelStoreError

CHECKSUMS = "checksums.sha256"
CARD = "model.json"
REQUIRED = ("saved_model.pb", "variables", CARD, CHECKSUMS)


def list_versions(model_dir: Path) -> list[int]:
    """Integer-named folders, ascending; anything else (temp folders, notes) is ignored."""
    if not model_dir.is_dir():
        return []
    versions = []
    for entry in model_dir.iterdir():
        name = entry.name  # ASCII digits only: "²" is a digit to str.isdigit, not to int()
        if entry.is_dir() and name.isascii() and name.isdigit() and not name.startswith("0"):
            versions.append(int(entry.name))
    return sorted(versions)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(version_dir: Path) -> None:
    lines = []
    for path in sorted(version_dir.rglob("*")):
        if path.is_file() and path.name != CHECKSUMS:
            lines.append(f"{file_sha256(path)}  {path.relative_to(version_dir).as_posix()}\n")
    (version_dir / CHECKSUMS).write_text("".join(lines))


def verify_version(version_dir: Path) -> dict:
    """Check completeness and checksums; return the parsed model.json or raise ModelStoreError."""
    missing = [name for name in REQUIRED if not (version_dir / name).exists()]
    if missing:
        raise ModelStoreError(f"{version_dir}: incomplete, missing {', '.join(missing)}")
    listed: dict[str, str] = {}
    for line in (version_dir / CHECKSUMS).read_text().splitlines():
        if line.strip():
            digest, _, rel = line.partition("  ")
            listed[rel] = digest
    on_disk = {
        p.relative_to(version_dir).as_posix()
        for p in version_dir.rglob("*")
        if p.is_file() and p.name != CHECKSUMS
    }
    if set(listed) != on_disk:
        extra = sorted(on_disk - set(listed))[:3]
        absent = sorted(set(listed) - on_disk)[:3]
        raise ModelStoreError(
            f"{version_dir}: files differ from {CHECKSUMS} (unlisted {extra}, absent {absent})"
        )
    for rel, digest in listed.items():
        if file_sha256(version_dir / rel) != digest:
            raise ModelStoreError(f"{version_dir}: checksum mismatch for {rel}")
    try:
        card = json.loads((version_dir / CARD).read_text())
    except (OSError, ValueError) as exc:
        raise ModelStoreError(f"{version_dir}: unreadable {CARD}: {exc}") from exc
    for key in ("class_names", "threshold", "input"):
        if key not in card:
            raise ModelStoreError(f"{version_dir}: {CARD} lacks {key!r}")
    return card


def publish_version(model_dir: Path, write: Callable[[Path, int], None]) -> tuple[int, Path]:
    """Write a new version (max + 1) through a temp folder and an atomic rename.

    `write(folder, version)` fills the folder; checksums are added here. Never overwrites.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    temp = model_dir / f".tmp-{uuid.uuid4().hex}"
    temp.mkdir()
    planned = (max(list_versions(model_dir), default=0)) + 1
    write(temp, planned)
    write_checksums(temp)
    version = planned
    for _ in range(100):
        target = model_dir / str(version)
        if not target.exists():
            if version != planned:  # another publisher took our number: renumber the card
                _renumber(temp, version)
            try:
                os.rename(temp, target)
                return version, target
            except OSError:
                pass
        version += 1
    raise ModelStoreError(f"could not publish a new version under {model_dir}")


def _renumber(folder: Path, version: int) -> None:
    card_path = folder / CARD
    if card_path.exists():
        card = json.loads(card_path.read_text())
        card["version"] = version
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        write_checksums(folder)
