"""Which representation POST /predict answers in, from the Accept header (RFC 9110 12.5.1).

Offered: JSON (the default), a FHIR R4 DiagnosticReport, and a DICOM SR for DICOM inputs. The
most specific media range that matches an offered type gives its quality (`application/dicom`
over `application/*` over `*/*`); the highest quality wins, ties go to the earlier offered type,
and q=0 refuses. Before, a substring test sent an SR to `Accept: application/dicom+json` (the
DICOM JSON model) and to `application/json, application/dicom;q=0.1`, and JSON to
`Accept: text/csv`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

JSON = "application/json"
FHIR = "application/fhir+json"
DICOM = "application/dicom"


# A q-value as RFC 9110 12.4.2 writes it, leniently (more than three decimals, or over 1, which
# is read as 1): ASCII digits and one point, nothing float() would also take.
DECIMAL = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


def media_ranges(accept: str) -> list[tuple[str, float]]:
    """(media range, quality) pairs; parameters other than q are ignored, as is a range with an
    unreadable q."""
    ranges = []
    for part in accept.split(","):
        media, *parameters = part.split(";")
        media = media.strip().lower()
        if not media:
            continue
        quality = 1.0
        try:
            for parameter in parameters:
                name, _, value = parameter.partition("=")
                if name.strip().lower() == "q":
                    value = value.strip()
                    if not DECIMAL.fullmatch(value):  # float() also takes nan, 1_0, Unicode
                        raise ValueError(value)
                    quality = min(float(value), 1.0)
        except ValueError:
            continue
        ranges.append((media, quality))
    return ranges


def quality(media_type: str, ranges: list[tuple[str, float]]) -> float:
    """The quality the most specific matching range gives `media_type` (0 when none match)."""
    wildcard = media_type.split("/", 1)[0] + "/*"
    best_specificity, best = -1, 0.0
    for media, value in ranges:
        specificity = {media_type: 2, wildcard: 1, "*/*": 0}.get(media, -1)
        if specificity > best_specificity:
            best_specificity, best = specificity, value
    return best


def choose(accept: str | None, offered: Sequence[str]) -> str | None:
    """The offered type the header prefers, or None when it accepts none of them. An absent or
    empty header accepts anything (the first offered)."""
    if not accept or accept.strip() in ("", "*/*"):  # what most clients send: no parsing
        return offered[0]
    ranges = media_ranges(accept)
    if not ranges:  # nothing readable: as if absent
        return offered[0]
    chosen, chosen_quality = None, 0.0
    for media_type in offered:
        value = quality(media_type, ranges)
        if value > chosen_quality:
            chosen, chosen_quality = media_type, value
    return chosen
