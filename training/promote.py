"""`python -m training promote`: copy a verified version from a staging store (where candidate
runs are trained) into a serving store as its next version, through the same temporary folder
and atomic rename as a fresh export."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

from app.model_store import CARD, CHECKSUMS, publish_version, verify_version


def promote(source: Path, model_dir: Path) -> tuple[int, Path]:
    """Publish `source` (a version folder) as the next version under `model_dir`."""
    card = verify_version(source)  # never promote a damaged or half-written version

    def write(folder: Path, version: int) -> None:
        for entry in source.iterdir():
            if entry.name in (CARD, CHECKSUMS):
                continue
            if entry.is_dir():
                shutil.copytree(entry, folder / entry.name)
            else:
                shutil.copy2(entry, folder / entry.name)
        promoted = {
            **card,
            "name": model_dir.name,
            "version": version,
            "promoted_from": {
                "path": str(source),
                "version": card.get("version"),
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        }
        (folder / CARD).write_text(json.dumps(promoted, indent=2) + "\n")

    return publish_version(model_dir, write)


def main_promote(args) -> int:
    from app.errors import ModelStoreError

    try:
        _version, folder = promote(Path(args.source), Path(args.model_store) / args.model_name)
    except ModelStoreError as exc:
        raise SystemExit(f"error: {exc}") from exc
    print(folder)
    return 0
