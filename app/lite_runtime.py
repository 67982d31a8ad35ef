"""A version's `model.tflite` run by LiteRT (TensorFlow Lite, XNNPACK on CPU): the same graph
as its SavedModel, converted when the version was exported, at a fraction of the per-call cost.

Measured side by side on 2 cores, a one-image call took 1.45 ms on LiteRT against 4.6 ms on
TensorFlow's runtime, and batch 32 ran at 1.6x the images/s (README, "Model runtime"). The
SavedModel stays the reference: a version's `.tflite` is served only after it gave the
SavedModel's answers on a fixed probe batch (`parity_probe`) when it was loaded; otherwise the
SavedModel serves.

LiteRT interpreters are not thread-safe, so calls take one from a pool (made on demand, so
there are as many as calls ever ran at once: the model instances, the explanation threads and
the inline caller) and give it back afterwards.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from app.imaging import TARGET_SIZE

TFLITE_FILE = "model.tflite"
# What the two runtimes must agree on, on the probe batch (XNNPACK orders sums differently; the
# shipped model's outputs differed by at most 2e-6):
# - probabilities within 1e-4 (absolute): a wrong graph moves them far beyond that;
# - the out-of-distribution flag (score above the card's threshold) on every image, and the
#   score within 1 % (relative) wherever it is within 10x the threshold. Far above it the score
#   is a Mahalanobis distance that float32 computes poorly when the features' covariance is
#   nearly singular (a model trained for one epoch on a few dozen images, as in the tests:
#   3.8 % on saturated probe images), and both runtimes flag such an image either way.
PROBABILITY_TOLERANCE = 1e-4
OOD_TOLERANCE = 1e-2
OOD_CHECKED_BELOW = 10.0  # x the flag threshold

log = logging.getLogger("pneumoscan.model")
# Printed by LiteRT's C++ logger on file descriptor 2 at a process's first model call; no
# setting silences it, and it would be the one line of the service's log that is not JSON.
XNNPACK_NOTICE = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
_first_call_lock = threading.Lock()
_first_call_done = False


def differences(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> dict[str, float]:
    """Per output of `expected`, the largest |got - expected| / max(1, |expected|); infinite
    when `got` lacks the output or has another shape."""
    result = {}
    for name, reference in expected.items():
        reference = np.asarray(reference, np.float64)
        value = got.get(name)
        if value is None or np.shape(value) != reference.shape:
            result[name] = float("inf")
            continue
        scale = np.maximum(1.0, np.abs(reference))
        result[name] = float(np.max(np.abs(np.asarray(value, np.float64) - reference) / scale))
    return result


def mismatches(
    got: dict[str, np.ndarray], expected: dict[str, np.ndarray], ood_threshold: float | None
) -> list[str]:
    """Where LiteRT's outputs (`got`) and the SavedModel's (`expected`) disagree beyond the
    rules above; empty when they agree."""
    found = differences(got, expected)
    problems = []
    for name in expected:
        if found[name] == float("inf"):
            problems.append(f"output {name} is missing or has another shape")
    if problems:
        return problems
    if found["probabilities"] > PROBABILITY_TOLERANCE:
        problems.append(
            f"probabilities differ by {found['probabilities']:.2e} "
            f"(allowed {PROBABILITY_TOLERANCE:.0e})"
        )
    if "ood_score" in expected:
        reference = np.asarray(expected["ood_score"], np.float64)
        value = np.asarray(got["ood_score"], np.float64)
        relative = np.abs(value - reference) / np.maximum(1.0, np.abs(reference))
        checked = np.ones(reference.shape, bool)
        if ood_threshold is not None:
            if np.any((value > ood_threshold) != (reference > ood_threshold)):
                problems.append("the out-of-distribution flag differs")
            checked = reference <= OOD_CHECKED_BELOW * ood_threshold
        if checked.any() and relative[checked].max() > OOD_TOLERANCE:
            problems.append(
                f"ood_score differs by {relative[checked].max():.2e} (allowed {OOD_TOLERANCE:.0e})"
            )
    return problems


def parity_probe() -> np.ndarray:
    """A fixed uint8 batch (N, 224, 224, 1): blank, saturated, gradients and seeded noise, so a
    graph that differs anywhere shows it."""
    rng = np.random.default_rng(20261202)
    ramp = np.linspace(0, 255, TARGET_SIZE, dtype=np.float64)
    images = [
        np.zeros((TARGET_SIZE, TARGET_SIZE)),
        np.full((TARGET_SIZE, TARGET_SIZE), 255.0),
        np.tile(ramp, (TARGET_SIZE, 1)),
        np.tile(ramp[:, None], (1, TARGET_SIZE)),
        *rng.integers(0, 256, (3, TARGET_SIZE, TARGET_SIZE)),
        # smooth blobs, closer to a radiograph's grey levels than noise
        *(
            np.clip(128 + 100 * np.sin(np.add.outer(ramp / f, ramp / g)), 0, 255)
            for f, g in ((17.0, 29.0), (41.0, 11.0), (60.0, 60.0))
        ),
    ]
    return np.stack(images).astype(np.uint8)[..., None]


def available() -> bool:
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


class LiteEngine:
    """The `serving_default` signature of one `.tflite` file; callable from any thread."""

    def __init__(self, path: Path, threads: int, signature: str = "serving_default") -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter
        self._content = path.read_bytes()
        self._threads = threads if threads > 0 else None
        self._signature = signature
        self._pool: queue.SimpleQueue = queue.SimpleQueue()
        runner = self._new()  # fails here, at load, if the file or signature is wrong
        self.outputs = tuple(sorted(runner.get_output_details()))
        _first_call_with_stderr_captured(runner)
        self._pool.put(runner)

    def _new(self):
        interpreter = self._interpreter(model_content=self._content, num_threads=self._threads)
        return interpreter.get_signature_runner(self._signature)  # the runner holds it

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        try:
            runner = self._pool.get_nowait()
        except queue.Empty:
            runner = self._new()
        try:
            # The signature runner resizes the input for a new batch size and returns copies.
            return runner(pixels=np.ascontiguousarray(pixels))
        finally:
            self._pool.put(runner)


def _first_call_with_stderr_captured(runner) -> None:
    """Run the process's first model call with file descriptor 2 sent to a temporary file, so
    LiteRT's notice becomes a debug record of the JSON log; any other output of that moment (a
    LiteRT error, or another thread's log line) is written back to stderr unchanged."""
    global _first_call_done
    probe = np.zeros((1, TARGET_SIZE, TARGET_SIZE, 1), np.uint8)
    with _first_call_lock:
        if _first_call_done:
            return
        _first_call_done = True
        try:
            sys.stderr.flush()
            captured = tempfile.TemporaryFile()
        except (OSError, ValueError, AttributeError):  # no stderr or no temporary file
            runner(pixels=probe)
            return
        with captured:
            saved = os.dup(2)
            os.dup2(captured.fileno(), 2)
            try:
                runner(pixels=probe)
            finally:
                try:
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                _pass_on(captured.read())


def _pass_on(output: bytes) -> None:
    rest = []
    for line in output.splitlines(keepends=True):
        if line.strip() == XNNPACK_NOTICE:
            log.debug("LiteRT: %s", XNNPACK_NOTICE.decode())
        else:
            rest.append(line)
    if rest:
        os.write(2, b"".join(rest))
