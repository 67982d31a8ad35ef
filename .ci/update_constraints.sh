#!/usr/bin/env bash
# Rewrites constraints.txt: every distribution that `pip install -e '.[dev]'` resolves today, at
# the version resolved, in a fresh venv (CPython 3.11, Linux). The Quick start, CI and the
# container build install through it, so what is tested is what is shipped. Run it to take
# upstream fixes, then run .ci/run before committing the new file.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/pneumoscan-lock-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

python3.11 -m venv "$WORK/venv"
# No -c here: the point is to resolve afresh from pyproject's ranges.
"$WORK/venv/bin/pip" install -q -e "$ROOT[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
{
  echo "# The versions CI tested, pinned for every install (Quick start, CI, the container image)."
  echo "# Resolved by .ci/update_constraints.sh on $(date -u +%Y-%m-%d) with CPython" \
    "$("$WORK/venv/bin/python" -c 'import platform; print(platform.python_version(), platform.machine())'), Linux."
  echo "# Security floors are in pyproject.toml; this file only fixes the versions within them."
  "$WORK/venv/bin/pip" freeze --exclude-editable --all | grep -v -E '^(pip|setuptools|wheel)=='
} >"$ROOT/constraints.txt"
# A direct reference (name @ url) cannot be a constraint, and would tie installs to a path here.
if grep -q ' @ ' "$ROOT/constraints.txt"; then
  grep ' @ ' "$ROOT/constraints.txt" >&2
  echo "constraints.txt has a direct reference: install that distribution from the index" >&2
  exit 1
fi
echo "constraints.txt: $(grep -c '==' "$ROOT/constraints.txt") pins"
