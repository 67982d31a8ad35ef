"""A loaded model version and the manager that watches the store and swaps versions atomically."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from app.errors import ModelStoreError, ModelUnavailableError
from app.imaging import TARGET_SIZE
from app.lite_runtime import TFLITE_FILE, LiteEngine, mismatches, parity_probe
from app.lite_runtime import available as litert_available
from app.model_store import list_versions, verify_version
from app.population import AgeRange

log = logging.getLogger("pneumoscan.model")
OOD_OUTPUT = "ood_score"  # optional second output of the signature (training.ood)
RUNTIMES = ("auto", "savedmodel")  # auto: the version's model.tflite when it has one


@dataclass
class LoadedModel:
    """One verified SavedModel version with the contract its model.json states."""

    name: str
    version: int
    path: Path
    card: dict
    _serve: object | None = field(repr=False)  # the SavedModel's signature; None on LiteRT alone
    _lite: LiteEngine | None = field(default=None, repr=False)

    @property
    def runtime(self) -> str:
        """'tflite' (LiteRT on the version's model.tflite) or 'savedmodel' (TensorFlow)."""
        return "savedmodel" if self._lite is None else "tflite"

    @property
    def class_names(self) -> list[str]:
        return list(self.card["class_names"])

    @property
    def threshold(self) -> float:
        return float(self.card["threshold"])

    @cached_property
    def ood_threshold(self) -> float | None:
        """The card's out-of-distribution flag threshold, when the signature has the score
        (load_version has checked that the card then has a finite one)."""
        outputs = (
            self._lite.outputs  # type: ignore[union-attr]
            if self._serve is None
            else self._serve.structured_outputs  # type: ignore[attr-defined]
        )
        if OOD_OUTPUT not in outputs:
            return None
        return float(self.card["ood"]["threshold"])

    @cached_property
    def trained_ages(self) -> AgeRange | None:
        """The ages (completed years) of the patients whose radiographs trained this version,
        from its card's population.age_years; None for a card without them."""
        return card_ages(self.card)

    def score(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 (N, 224, 224, 1) -> probabilities (N, 2) in class_names order, and the
        out-of-distribution scores (N,) when the version has them (same model call)."""
        if batch.dtype != np.uint8 or batch.shape[1:] != (TARGET_SIZE, TARGET_SIZE, 1):
            raise ValueError(f"model input must be uint8 (N, 224, 224, 1), got {batch.shape}")
        if self._lite is not None:
            lite = self._lite(batch)
            return lite["probabilities"], lite.get(OOD_OUTPUT)
        import tensorflow as tf

        out = self._serve(pixels=tf.constant(batch))  # type: ignore[operator]
        ood = out.get(OOD_OUTPUT)
        return out["probabilities"].numpy(), None if ood is None else ood.numpy()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, 224, 224, 1) -> probabilities (N, 2) in class_names order."""
        return self.score(batch)[0]


def configure_threads(intra_op: int) -> int:
    """Set TensorFlow's intra-op thread count (0 keeps its default) before the first op runs;
    returns the count in effect. TensorFlow fixes it at initialisation, so a second app in the
    same process (tests) keeps what the first one set."""
    import tensorflow as tf

    current = tf.config.threading.get_intra_op_parallelism_threads()
    if intra_op and intra_op != current:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
            current = intra_op
        except RuntimeError:
            log.warning(
                "TensorFlow is already initialised; model threads stay at %s", current or "default"
            )
    return current


def load_version(
    model_dir: Path, version: int, runtime: str = "auto", threads: int = 1
) -> LoadedModel:
    """Verify and load one version; raise ModelStoreError if it is not servable.

    With runtime 'auto', a version that has `model.tflite` is served by LiteRT with `threads`
    threads per call (0: the runtime's default), once that file gave the SavedModel's answers
    on the probe batch: the answers its card recorded at export (then TensorFlow is not even
    imported), or, for a card without them, the SavedModel's own, computed now. A version
    without the file, a file that fails the check (logged as an error), or a machine without
    LiteRT gets TensorFlow's runtime on the SavedModel.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
    path = model_dir / str(version)
    card = verify_version(path)
    spec = card.get("input", {})
    if spec.get("dtype") != "uint8" or list(spec.get("shape", []))[1:] != [
        TARGET_SIZE,
        TARGET_SIZE,
        1,
    ]:
        raise ModelStoreError(f"{path}: input contract {spec} is not uint8 [N,224,224,1]")
    try:
        card_ages(card)
    except ValueError as exc:
        raise ModelStoreError(f"{path}: model.json population.age_years: {exc}") from exc
    if card.get("class_names") != ["NORMAL", "PNEUMONIA"]:
        raise ModelStoreError(f"{path}: class_names must be ['NORMAL', 'PNEUMONIA']")
    lite = runtime == "auto" and (path / TFLITE_FILE).is_file()
    if lite and not litert_available():
        log.warning(
            "%s has %s but LiteRT (ai-edge-litert) is not installed: serving it with "
            "TensorFlow, slower",
            path,
            TFLITE_FILE,
        )
        lite = False
    recorded = card.get("tflite", {}).get("probe_reference") if lite else None
    model = None
    if recorded:  # checked against the answers the card recorded: no TensorFlow at all
        try:
            model = _lite_model(model_dir.name, version, path, card, threads, recorded)
        except ModelStoreError as exc:  # the SavedModel, the reference, serves instead
            log.error("%s: serving this version with TensorFlow's runtime instead", exc)
    if model is None:
        model = _savedmodel(model_dir.name, version, path, card, threads)
        if lite and not recorded:  # checked against the SavedModel's answers, computed now
            try:
                model._lite = _checked_engine(path, card, threads, _answers(model, path))
            except ModelStoreError as exc:
                log.error("%s: serving this version with TensorFlow's runtime instead", exc)
    # Warm up before declaring ready (the first TensorFlow call traces the graph).
    try:
        probs, ood = model.score(np.zeros((1, TARGET_SIZE, TARGET_SIZE, 1), np.uint8))
    except Exception as exc:
        raise ModelStoreError(f"{path}: warm-up prediction failed: {exc}") from exc
    if probs.shape != (1, 2) or not np.all(np.isfinite(probs)):
        raise ModelStoreError(f"{path}: warm-up gave {probs!r}, expected finite (1, 2)")
    if ood is not None and (ood.shape != (1,) or not np.all(np.isfinite(ood))):
        raise ModelStoreError(f"{path}: warm-up gave {OOD_OUTPUT} {ood!r}, expected finite (1,)")
    return model


def card_ages(card: dict) -> AgeRange | None:
    """A card's population.age_years ([low, high] completed years); ValueError if malformed."""
    population = card.get("population")
    if population is None:
        return None
    if not isinstance(population, dict):
        raise ValueError(f"population must be an object, got {type(population).__name__}")
    ages = population.get("age_years")
    if ages is None:
        return None
    if (
        not isinstance(ages, list)
        or len(ages) != 2
        or not all(isinstance(a, int) and not isinstance(a, bool) for a in ages)
    ):
        raise ValueError(f"expected [low, high] in completed years, got {ages!r}")
    return AgeRange(ages[0], ages[1])


def _check_ood_threshold(path: Path, card: dict, outputs) -> None:
    if OOD_OUTPUT in outputs:
        threshold = card.get("ood", {}).get("threshold")
        if not isinstance(threshold, int | float) or not np.isfinite(threshold):
            raise ModelStoreError(
                f"{path}: the signature returns {OOD_OUTPUT} but model.json "
                "has no finite ood.threshold"
            )


def _savedmodel(name: str, version: int, path: Path, card: dict, threads: int) -> LoadedModel:
    """The version on TensorFlow's runtime."""
    try:
        import tensorflow as tf
    except ImportError as exc:  # a serving install: TensorFlow is the `training` extra
        raise ModelStoreError(
            f"{path}: this version needs TensorFlow's runtime (no {TFLITE_FILE} that passed "
            "its check, or PNEUMOSCAN_MODEL_RUNTIME=savedmodel) and TensorFlow is not "
            "installed: pip install 'pneumoscan[training]', or publish the version with "
            "`python -m training attach-tflite`"
        ) from exc
    configure_threads(threads)  # TensorFlow fixes it at its first op; a no-op after that

    try:
        loaded = tf.saved_model.load(str(path))
        serve = loaded.signatures[card.get("signature", "serving_default")]
    except Exception as exc:
        raise ModelStoreError(f"{path}: SavedModel failed to load: {exc}") from exc
    _check_ood_threshold(path, card, serve.structured_outputs)
    model = LoadedModel(name, version, path, card, serve)
    model._loaded = loaded  # type: ignore[attr-defined]  # keep the trackable alive
    return model


def _lite_model(
    name: str, version: int, path: Path, card: dict, threads: int, recorded: object
) -> LoadedModel:
    """The version on LiteRT alone, checked against the SavedModel's answers on the probe
    batch as its card recorded them at export."""
    try:
        expected = {
            str(key): np.asarray(value, np.float32)
            for key, value in recorded.items()  # type: ignore[attr-defined]
        }
        if "probabilities" not in expected:
            raise KeyError("probabilities")
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ModelStoreError(
            f"{path / TFLITE_FILE}: its card's recorded answers are unreadable "
            f"({type(exc).__name__})"
        ) from exc
    against = "the answers its card recorded for the SavedModel"
    engine = _checked_engine(path, card, threads, expected, against)
    _check_ood_threshold(path, card, engine.outputs)
    return LoadedModel(name, version, path, card, None, engine)


def _answers(model: LoadedModel, path: Path) -> dict[str, np.ndarray]:
    """The SavedModel's outputs on the probe batch, computed now."""
    try:
        probs, ood = model.score(parity_probe())
    except Exception as exc:
        raise ModelStoreError(f"{path}: the SavedModel failed on the probe batch: {exc}") from exc
    return {"probabilities": probs} if ood is None else {"probabilities": probs, OOD_OUTPUT: ood}


def _checked_engine(
    path: Path,
    card: dict,
    threads: int,
    expected: dict[str, np.ndarray],
    against: str = "the SavedModel's answers",
) -> LiteEngine:
    """The version's LiteRT engine, once it gave `expected` (the SavedModel's outputs) on the
    probe batch; ModelStoreError otherwise."""
    try:
        engine = LiteEngine(path / TFLITE_FILE, threads, card.get("signature", "serving_default"))
        lite = engine(parity_probe())
    except Exception as exc:
        raise ModelStoreError(
            f"{path / TFLITE_FILE}: LiteRT failed to load or run it: {exc}"
        ) from exc
    threshold = card.get("ood", {}).get("threshold") if OOD_OUTPUT in expected else None
    problems = mismatches(lite, expected, threshold)
    if problems:
        raise ModelStoreError(
            f"{path / TFLITE_FILE} does not give {against} on the probe batch: "
            f"{'; '.join(problems)}; republish the version"
        )
    return engine


class ModelManager:
    """Serves the highest valid (or pinned) version and polls the store for new ones.

    A bad version is logged and skipped once (until its folder changes); the current model keeps
    serving. Swapping is a single reference assignment, so in-flight batches finish on the
    model they started with and no request fails during a switch.
    """

    def __init__(
        self,
        store: Path,
        name: str,
        pinned: int | None,
        poll_seconds: float,
        runtime: str = "auto",
        threads: int = 1,
    ) -> None:
        self.model_dir = store / name
        self.runtime = runtime
        self.threads = threads
        self.pinned = pinned
        self.poll_seconds = poll_seconds
        self.current: LoadedModel | None = None
        self.failed: dict[int, str] = {}
        self._failed_mtime: dict[int, float] = {}
        # "Nothing to serve" problems logged since a version last loaded: each said once, not
        # on every poll.
        self._said: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Versions other than the serving one, kept for explanations of earlier predictions
        # (the ones a switch replaced or an explanation loaded back), least recently used
        # dropped first beyond `retired_max`.
        self._retired: dict[int, LoadedModel] = {}
        self._retired_lock = threading.Lock()
        self.retired_max = 2

    def get(self) -> LoadedModel:
        model = self.current
        if model is None:
            raise ModelUnavailableError(
                "No valid model version is loaded yet; see /models and /readyz."
            )
        return model

    def available(self) -> list[int]:
        return list_versions(self.model_dir)

    def version(self, version: int) -> LoadedModel:
        """The model of one version: the serving one, a recently replaced one kept in memory,
        or loaded (and verified) from the store now. Blocking: call it off the event loop.
        Raises ModelStoreError when that version is gone or no longer valid."""
        current = self.get()
        if current.version == version:
            return current
        with self._retired_lock:
            model = self._retired.get(version)
            if model is None:
                model = load_version(self.model_dir, version, self.runtime, self.threads)
                log.info("loaded model version %d to explain its predictions", version)
            self._keep_retired(model)
            return model

    def _keep_retired(self, model: LoadedModel) -> None:
        """Remember `model` as the most recently used non-serving version (bounded)."""
        self._retired.pop(model.version, None)
        self._retired[model.version] = model
        while len(self._retired) > self.retired_max:
            self._retired.pop(next(iter(self._retired)))

    def refresh(self) -> None:
        """Load the best candidate version if it differs from the one serving."""
        with self._lock:
            versions = self.available()
            if self.pinned is not None:
                candidates = [self.pinned] if self.pinned in versions else []
                if not candidates and (self.current is None or self.current.version != self.pinned):
                    self._say(f"pinned version {self.pinned} not found under {self.model_dir}")
            else:
                candidates = sorted(versions, reverse=True)
            if self.current is not None and self.current.version not in versions:
                log.error(
                    "serving version %d vanished from the store; keeping it in memory",
                    self.current.version,
                )
            for version in candidates:
                if self.current is not None and version == self.current.version:
                    return
                if (
                    self.current is not None
                    and version < self.current.version
                    and self.pinned is None
                ):
                    return
                folder = self.model_dir / str(version)
                try:
                    mtime = max((p.stat().st_mtime for p in folder.rglob("*")), default=0.0)
                except OSError:
                    mtime = -1.0
                if version in self.failed and self._failed_mtime.get(version) == mtime:
                    continue
                try:
                    model = load_version(self.model_dir, version, self.runtime, self.threads)
                except ModelStoreError as exc:
                    self.failed[version] = str(exc)
                    self._failed_mtime[version] = mtime
                    log.error("skipping model version %d: %s", version, exc)
                    continue
                previous = self.current.version if self.current else None
                if self.current is not None:
                    with self._retired_lock:
                        self._keep_retired(self.current)
                self.current = model
                self.failed.pop(version, None)
                self._said.clear()
                log.info(
                    "serving model %s version %d on %s (was %s)",
                    model.name,
                    version,
                    model.runtime,
                    previous,
                )
                return
            if self.current is None:
                self._say(f"no valid model version under {self.model_dir}: not ready")

    def _say(self, problem: str) -> None:
        """Log a problem once until a version loads (not on every poll)."""
        if problem not in self._said:
            log.error("%s", problem)
            self._said.add(problem)

    def start_polling(self) -> None:
        self._thread = threading.Thread(target=self._poll, name="model-store-poll", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception:
                log.exception("model store poll failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
