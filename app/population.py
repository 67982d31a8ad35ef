"""The patient's age against the ages of the patients whose radiographs trained the model.

The shipped model learned from pediatric radiographs only: Kermany et al. 2018 describe the
cohort as patients one to five years old. An adult's chest radiograph looks different (body
size, heart and rib proportions, adult disease), so the model's probabilities mean less there,
and nothing in the pixels makes the out-of-distribution score catch it reliably. A DICOM object
carries the age; a JPEG or PNG carries none, so its age is "unknown" unless the sender gives it
in the `X-Patient-Age` header (a DICOM Age String, as the RIS holds it).

The age is read here and only the verdict leaves this module: never the age or the birth date,
so no patient data reaches an answer, the audit trail or a log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from typing import Literal

AgeStatus = Literal["within", "outside", "unknown"]
AgeSource = Literal["PatientAge", "PatientBirthDate", "X-Patient-Age"]
AGE_HEADER = "X-Patient-Age"

# Age String (PS3.5 6.2, VR AS): three digits and D, W, M or Y; "018M" is 18 months.
AGE_STRING = re.compile(r"(\d{3})([DWMY])", re.ASCII)  # the VR's digits: ASCII, not "٠٤٥"
# Date (VR DA): YYYYMMDD. Some old objects write YYYY.MM.DD (ACR-NEMA 2.0); it is accepted too.
DICOM_DATE = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})", re.ASCII)
# Dates that can stand for "when the radiograph was taken", best first.
REFERENCE_DATES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
OLDEST_PLAUSIBLE_YEARS = 130


@dataclass(frozen=True)
class AgeRange:
    """Completed years, both ends included: 1-5 is from the first birthday to the day before
    the sixth."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.high <= OLDEST_PLAUSIBLE_YEARS:
            raise ValueError(
                f"an age range needs 0 <= low <= high <= {OLDEST_PLAUSIBLE_YEARS}, "
                f"got {self.low}-{self.high}"
            )

    @classmethod
    def parse(cls, text: str) -> AgeRange:
        """'1-5' (completed years); raises ValueError with the reason."""
        match = re.fullmatch(r"\s*(\d{1,3})\s*-\s*(\d{1,3})\s*", text, re.ASCII)
        if match is None:
            raise ValueError(f"expected completed years as LOW-HIGH (such as 1-5), got {text!r}")
        return cls(int(match[1]), int(match[2]))

    def as_list(self) -> list[int]:
        return [self.low, self.high]


@dataclass(frozen=True)
class PatientAge:
    """Completed years at the radiograph, and which attribute gave them. Never logged."""

    years: int
    source: AgeSource

    def __repr__(self) -> str:  # an accidental log line or traceback shows no age
        return f"PatientAge(source={self.source!r})"


def age_from_age_string(value: object) -> int | None:
    """Completed years of a DICOM Age String, or None when it is absent or malformed."""
    match = AGE_STRING.fullmatch(str(value or "").strip().upper())
    if match is None:
        return None
    count, unit = int(match[1]), match[2]
    if unit == "Y":
        return count
    if unit == "M":
        return count // 12
    if unit == "W":
        return (count * 7 * 4) // 1461  # 365.25 days a year, in integers
    return (count * 4) // 1461


def age_from_header(value: str | None) -> PatientAge | None:
    """The `X-Patient-Age` header: None when absent or empty; ValueError (without the value)
    when it is not a DICOM Age String of a plausible age."""
    if value is None or not value.strip():
        return None
    years = age_from_age_string(value)
    if years is None or years > OLDEST_PLAUSIBLE_YEARS:
        raise ValueError(
            f"{AGE_HEADER} must be a DICOM Age String: three digits and D, W, M or Y "
            "(045Y, 018M, 010W, 020D), at most 130 years"
        )
    return PatientAge(years, "X-Patient-Age")


def parse_dicom_date(value: object) -> date | None:
    match = DICOM_DATE.fullmatch(str(value or "").strip())
    if match is None:
        return None
    try:
        return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:  # 20230231
        return None


def completed_years(birth: date, on: date) -> int:
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def patient_age(ds) -> PatientAge | None:
    """The patient's age at the radiograph from a pydicom dataset: PatientAge, else the birth
    date against the study's (or series', acquisition's, content's) date. None when neither is
    there or readable, or when the result is impossible (a birth after the study)."""
    years = age_from_age_string(_text(ds, "PatientAge"))
    if years is not None and years <= OLDEST_PLAUSIBLE_YEARS:  # "999Y" is a placeholder
        return PatientAge(years, "PatientAge")
    birth = parse_dicom_date(_text(ds, "PatientBirthDate"))
    if birth is None:
        return None
    for keyword in REFERENCE_DATES:
        taken = parse_dicom_date(_text(ds, keyword))
        if taken is not None:
            years = completed_years(birth, taken)
            if 0 <= years <= OLDEST_PLAUSIBLE_YEARS:
                return PatientAge(years, "PatientBirthDate")
            return None
    return None


def _text(ds, keyword: str) -> str:
    """An attribute as text; a value pydicom cannot parse counts as absent."""
    try:
        value = ds.get(keyword, "")
    except Exception:  # noqa: BLE001 - hostile bytes in a lazily parsed element
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return ""
    return str(value or "")


def age_status(age: PatientAge | None, trained: AgeRange) -> AgeStatus:
    if age is None:
        return "unknown"
    return "within" if trained.low <= age.years <= trained.high else "outside"
