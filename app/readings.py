"""`pneumoscan readings`: the model measured against this site's radiologists, from the reads
reported with PUT /predictions/{id}/reading. Internal test metrics overstate how a model does
on another hospital's images (acquisition shift; README, model card); these are its numbers on
yours, as your readers read them, with 95 % Wilson intervals, per model version."""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import sys
import time
from contextlib import closing
from pathlib import Path

from app.records import add_data_dir_argument, audit_database_of, count_readings, latest_reads

Z95 = 1.959963984540054


def wilson(successes: int, total: int) -> list[float] | None:
    """The 95 % Wilson score interval of a proportion; None without observations."""
    if total == 0:
        return None
    p = successes / total
    denominator = 1 + Z95**2 / total
    centre = (p + Z95**2 / (2 * total)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / total + Z95**2 / (4 * total**2)) / denominator
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def _rate(successes: int, total: int) -> dict:
    return {
        "value": round(successes / total, 4) if total else None,
        "n": total,
        "ci95": wilson(successes, total),
    }


def summarise(counts: list[tuple[int, str, str, int]]) -> dict[str, dict]:
    """Per model version, from (version, model label, reader label, count): the confusion
    matrix with the read as the truth, sensitivity, specificity, PPV, NPV and agreement."""
    report: dict[str, dict] = {}
    for version in sorted({row[0] for row in counts}):
        cell = {(m, r): n for v, m, r, n in counts if v == version}
        tp = cell.get(("PNEUMONIA", "PNEUMONIA"), 0)
        fn = cell.get(("NORMAL", "PNEUMONIA"), 0)
        fp = cell.get(("PNEUMONIA", "NORMAL"), 0)
        tn = cell.get(("NORMAL", "NORMAL"), 0)
        report[str(version)] = {
            "reads": tp + fn + fp + tn,
            "confusion": {"tp": tp, "fn": fn, "fp": fp, "tn": tn},
            "sensitivity": _rate(tp, tp + fn),
            "specificity": _rate(tn, tn + fp),
            "ppv": _rate(tp, tp + fp),
            "npv": _rate(tn, tn + fn),
            "agreement": _rate(tp + tn, tp + fn + fp + tn),
        }
    return report


def read_counts(database: Path, since: float) -> list[tuple[int, str, str, int]]:
    """The counts from the audit database, opened read-only (the service may be running)."""
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        has_table = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'readings'"
        ).fetchone()
        return count_readings(db, since) if has_table else []


def read_counts_split(
    database: Path, since: float, split_by: str
) -> dict[str, list[tuple[int, str, str, int]]]:
    """The same counts split by a property of the prediction, read-only: "age_check" (within,
    outside, unknown; "not checked" for predictions made without it) or "key_id" (the key that
    sent the image: one per PACS gateway or site)."""
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        if "readings" not in tables:
            return {}
        columns = {row[1] for row in db.execute("PRAGMA table_info(predictions)")}
        group = f"COALESCE(p.{split_by}, 'not checked')" if split_by in columns else "'not checked'"
        rows = db.execute(
            "SELECT split, model_version, model_label, reader_label, COUNT(*) "
            f"FROM ({latest_reads(db, group)}) GROUP BY 1, 2, 3, 4",
            (since,),
        ).fetchall()
    split: dict[str, list[tuple[int, str, str, int]]] = {}
    for value, version, model, reader, count in rows:
        split.setdefault(str(value), []).append((int(version), str(model), str(reader), count))
    return split


def report(database: Path, since: float) -> dict[str, dict]:
    """Per model version: the rates over every read, and the same split by the patient age
    check, so a site that scores adults sees how the model does on them apart (the shipped
    model learned from children aged 1-5), and by the key that sent the images, so a network
    of hospitals sees each gateway's site apart (their machines differ)."""
    versions = summarise(read_counts(database, since))
    for split_by, name in (("age_check", "by_age_check"), ("key_id", "by_sender")):
        for value, counts in sorted(read_counts_split(database, since, split_by).items()):
            for version, rates in summarise(counts).items():
                versions[version].setdefault(name, {})[value] = rates
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pneumoscan readings",
        description="Sensitivity, specificity, PPV, NPV and agreement of each model version "
        "against the radiologists' reads reported to this service, overall, by the patient "
        "age check and by the key that sent the images (JSON on stdout).",
    )
    add_data_dir_argument(parser)
    parser.add_argument("--days", type=float, help="only reads reported in the last N days")
    args = parser.parse_args(argv)
    database = audit_database_of(args)
    if not database.is_file():
        print(f"pneumoscan readings: no audit database at {database}", file=sys.stderr)
        return 2
    since = time.time() - args.days * 86400 if args.days else 0.0
    try:
        versions = report(database, since)
    except sqlite3.Error as exc:
        print(f"pneumoscan readings: cannot read {database}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"since": since or None, "versions": versions}, indent=2))
    return 0
