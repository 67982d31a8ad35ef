"""The dependency lock: `constraints.txt` pins every distribution the tests run with, within the
ranges pyproject states, so that a fresh install (the Quick start, CI, the container image) gets
the versions that were tested rather than whatever was released since."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# The installer's own tools are the venv's, not the project's (.ci/update_constraints.sh).
INSTALLER = {"pip", "setuptools", "wheel"}
# Parsers of untrusted input with published fixes: the last release each advisory affects.
# pyproject's floors must leave these out even for an install without the constraints.
VULNERABLE = {
    # GHSA-86qp-5c8j-p5mr Host header (fixed in 1.0.1), GHSA-82w8-qh3p-5jfq form limits (1.3.1)
    "starlette": "1.3.0",
    "python-multipart": "0.0.30",  # GHSA-pp6c-gr5w-3c5g, GHSA-mj87-hwqh-73pj, GHSA-v9pg-7xvm-68hf
    "h11": "0.15.0",  # CVE-2025-43859 chunked-body request smuggling
    "pillow": "12.2.0",  # CVE-2026-59204, CVE-2026-59199 and others fixed in 12.3.0
}


def pins() -> dict[str, Version]:
    pinned: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, separator, version = line.partition("==")
        assert separator and " @ " not in line, f"not an exact pin: {line!r}"
        assert canonicalize_name(name) not in pinned, f"pinned twice: {name}"
        pinned[canonicalize_name(name)] = Version(version)
    return pinned


def resolved_requirements() -> list[tuple[str, Requirement]]:
    """(requiring distribution, requirement) for everything `pneumoscan[dev]` installs, walked
    through the installed metadata with each distribution's requested extras."""
    found: dict[tuple[str, str], Requirement] = {}
    extras_of: dict[str, set[str]] = {"pneumoscan": {"dev"}}
    todo = [("pneumoscan", {"dev"})]
    while todo:
        name, extras = todo.pop()
        for text in metadata.distribution(name).requires or []:
            requirement = Requirement(text)
            if requirement.marker and not any(
                requirement.marker.evaluate({"extra": extra}) for extra in extras | {""}
            ):
                continue
            found[name, str(requirement)] = requirement
            wanted = canonicalize_name(requirement.name)
            new = set(requirement.extras) - extras_of.get(wanted, set())
            if wanted not in extras_of or new:
                extras_of.setdefault(wanted, set()).update(requirement.extras)
                todo.append((wanted, set(requirement.extras)))
    return [(parent, requirement) for (parent, _), requirement in found.items()]


def test_every_installed_dependency_is_pinned_at_the_version_installed() -> None:
    pinned = pins()
    needed = (
        {canonicalize_name(requirement.name) for _, requirement in resolved_requirements()}
        - {"pneumoscan"}
        - INSTALLER
    )
    missing = sorted(needed - set(pinned))
    assert not missing, f"not in constraints.txt (run .ci/update_constraints.sh): {missing}"
    differing = {
        name: (str(pinned[name]), metadata.version(name))
        for name in needed
        if Version(metadata.version(name)) != pinned[name]
    }
    assert not differing, (
        "installed versions differ from constraints.txt (pinned, installed); install with "
        f"`pip install -c constraints.txt -e '.[dev]'`: {differing}"
    )


def test_each_pin_satisfies_every_range_that_asks_for_it() -> None:
    pinned = pins()
    conflicts = [
        f"{parent} needs {requirement}, pinned {pinned[name]}"
        for parent, requirement in resolved_requirements()
        if (name := canonicalize_name(requirement.name)) in pinned
        and not requirement.specifier.contains(pinned[name], prereleases=True)
    ]
    assert not conflicts


@pytest.mark.parametrize("name", sorted(VULNERABLE))
def test_pyproject_floors_leave_out_the_vulnerable_releases(name: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    stated = [
        requirement
        for requirement in map(Requirement, project["dependencies"])
        if canonicalize_name(requirement.name) == name
    ]
    assert stated, f"{name} has no floor of its own in pyproject.toml"
    for requirement in stated:
        assert not requirement.specifier.contains(VULNERABLE[name]), str(requirement)
        assert requirement.specifier.contains(str(pins()[name]))
