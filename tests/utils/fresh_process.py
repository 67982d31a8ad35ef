"""Run Python code in a process of its own (for what one process can only do once, such as
setting TensorFlow's threads, or checking what a fresh process imports)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def run_code(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`code` run by this interpreter from the repository root, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def last_line(code: str, timeout: float = 120) -> str:
    """The last line `code` prints; CalledProcessError if it fails."""
    done = run_code(code, timeout)
    done.check_returncode()
    return done.stdout.strip().splitlines()[-1]
