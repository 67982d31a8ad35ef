"""`pneumoscan check FILE|FOLDER ...`: what the service would answer for each of a site's files,
before any is sent.

Onboarding a PACS or a modality starts with an export of sample images. This runs each through
the service's own decode and admission rules (format, size, DICOM modality, view, body part,
"for processing", bit depth, blank frames), the patient age check, and whether an SR can be
made for it, with the settings the service would have (PNEUMOSCAN_* variables), and prints
`scored` or the status and error code the API would give, with its message. No model runs and
nothing is sent or stored. Exit status 0 when every file would be scored, 1 when any would be
refused: a site can run it over a new modality's export in its own checks. Printed per file:
the path, the verdicts and the refusal message, never a patient attribute.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from app.classifier import card_ages
from app.errors import PneumoscanError
from app.imaging import check_content, decode_image
from app.model_store import list_versions
from app.population import AgeRange, age_status
from app.settings import Settings


def trained_ages(settings: Settings) -> AgeRange | None:
    """The ages the serving version would check against: its card's, else the setting's
    (the version the service would serve: the pinned one, else the highest in the store)."""
    model_dir = settings.model_store / settings.model_name
    versions = list_versions(model_dir)
    version = settings.model_version or (versions[-1] if versions else None)
    ages = None
    if version is not None:
        try:
            ages = card_ages(json.loads((model_dir / str(version) / "model.json").read_text()))
        except (OSError, ValueError):
            ages = None
    return settings.trained_ages(ages)


def check_bytes(data: bytes, settings: Settings, trained: AgeRange | None) -> dict:
    """The service's answer to one upload, short of the model: `status` 200 with the facts the
    answer would carry, or the 4xx status, `code` and `message` it would give."""
    from app.reports import sr_problem

    try:
        if len(data) > settings.max_upload_bytes:
            return {
                "status": 413,
                "code": "payload_too_large",
                "message": f"{len(data)} bytes, over PNEUMOSCAN_MAX_UPLOAD_BYTES",
            }
        decoded = decode_image(data, max_pixels=settings.max_pixels, min_side=settings.min_side)
        check_content(decoded.pixels)
    except PneumoscanError as exc:
        return {"status": exc.status_code, "code": exc.code, "message": exc.message}
    result: dict = {
        "status": 200,
        "format": decoded.format,
        "width": decoded.width,
        "height": decoded.height,
        "age_check": None if trained is None else age_status(decoded.patient_age, trained),
    }
    if (
        trained is not None
        and result["age_check"] == "outside"
        and settings.age_outside == "refuse"
    ):
        return {
            "status": 422,
            "code": "age_outside_training",
            "message": f"the patient's age is outside {trained.low}-{trained.high} years "
            "and PNEUMOSCAN_AGE_OUTSIDE=refuse",
        }
    if decoded.source is not None:
        problem = sr_problem(decoded.source)
        result["sr"] = "possible" if problem is None else f"422 unsupported_dicom: {problem}"
    return result


def files_under(paths: list[Path]) -> Iterator[Path]:
    """The files named, and every file under the folders named (hidden ones skipped)."""
    for path in paths:
        if path.is_dir():
            for found in sorted(path.rglob("*")):
                hidden = any(part.startswith(".") for part in found.relative_to(path).parts)
                if found.is_file() and not hidden:
                    yield found
        else:
            yield path


def describe(result: dict) -> str:
    if result["status"] != 200:
        return f"{result['status']} {result['code']}: {result['message']}"
    facts = [f"{result['format']} {result['width']}x{result['height']}"]
    if result["age_check"] is not None:
        facts.append(f"age {result['age_check']}")
    if "sr" in result:
        facts.append(f"SR {result['sr']}")
    return f"scored ({', '.join(facts)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pneumoscan check",
        description="What the service would answer for each file (no model runs, nothing is "
        "sent): scored, or the status and error code with its message. Exit status 1 when any "
        "file would be refused.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="files or folders (recursive)")
    parser.add_argument("--json", action="store_true", help="one JSON object per file")
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:  # one line, as `pneumoscan serve` says it
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors()
        )
        print(f"pneumoscan check: invalid settings: {problems}", file=sys.stderr)
        return 2
    trained = trained_ages(settings)
    outcomes: Counter[str] = Counter()
    for path in files_under(args.paths):
        try:
            data = path.read_bytes()
        except OSError as exc:
            result = {"status": None, "code": "unreadable", "message": exc.strerror or str(exc)}
        else:
            result = check_bytes(data, settings, trained)
        outcomes["scored" if result["status"] == 200 else str(result["code"])] += 1
        if args.json:
            print(json.dumps({"path": str(path), **result}))
        else:
            print(f"{path}: {describe(result)}")
    total = sum(outcomes.values())
    if not total:
        print("pneumoscan check: no files found", file=sys.stderr)
        return 2
    summary = ", ".join(f"{count} {outcome}" for outcome, count in outcomes.most_common())
    print(f"{total} files: {summary}", file=sys.stderr)
    return 0 if outcomes["scored"] == total else 1


if __name__ == "__main__":
    sys.exit(main())
