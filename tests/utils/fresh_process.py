"""Run Python code in a process of its own (for what one process can only do once, such as
setting TensorFlow's threads, or checking what a fresh process imports)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def last_line(code: str, timeout: float = 120) -> str:
    """The last line `code` prints, run by this interpreter from the repository root."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=True,
    ).stdout
    return out.strip().splitlines()[-1]
