"""Service settings, read from `PNEUMOSCAN_*` environment variables (one class, fail fast)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.population import AgeRange

REPO_ROOT = Path(__file__).resolve().parent.parent
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
# Room for multipart boundaries and part headers around the largest accepted file.
MULTIPART_OVERHEAD = 64 * 1024


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may use: its affinity mask, lowered to a cgroup v2 CPU quota (a
    container started with --cpus) when one is set."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


class Settings(BaseSettings):
    """Every knob of the service. Limits exist so one caller cannot exhaust the host."""

    model_config = SettingsConfigDict(
        env_prefix="PNEUMOSCAN_", env_file=None, extra="ignore", protected_namespaces=()
    )

    model_store: Path = Field(REPO_ROOT / "model_store", description="Model store root.")
    model_name: str = Field("pneumonia", description="Model name under the store.")
    model_version: int | None = Field(None, description="Pin one version; default highest valid.")
    api_keys: str = Field("", description="Comma-separated API keys (X-API-Key).")
    reader_keys: str = Field(
        "",
        description="Comma-separated keys for a RIS or reporting system: they report "
        "radiologists' reads (PUT /predictions/{id}/reading, PUT /studies/{uid}/reading) and "
        "look up predictions (GET /predictions/{id}, GET /studies/{uid}/predictions) made "
        "with any API key, and nothing else.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="A file of API keys (a Docker or Kubernetes secret), one per line: the key, "
        "or sha256:<hex> of it; `#` comments. Added to api_keys, and read again when it changes "
        "(keys_reload_seconds, SIGHUP), so keys are added or revoked without a restart.",
    )
    reader_keys_file: Path | None = Field(
        None, description="The same for reader keys (added to reader_keys)."
    )
    keys_reload_seconds: float = Field(
        60.0,
        ge=0,
        description="How often the key files are checked for changes (also at once on "
        "SIGHUP); 0: read at start only.",
    )
    allow_no_auth: bool = Field(
        False, description="Development only: run without API keys (every caller is 'anonymous')."
    )
    data_dir: Path = Field(REPO_ROOT / "data", description="Audit database and stored images.")
    max_upload_bytes: int = Field(64 * 1024 * 1024, gt=0, description="Largest upload (413).")
    # 24 clients posting 21 MB 12-bit DICOMs (3000 x 3500) at once, 3 times each, peaked the
    # process at 1.50 GB without a budget and 1.25 GB at 256 MiB (39-43 of 72 answered, the
    # rest 503); benchmarks.large_upload_burst, with the table-driven DICOM decode (before
    # it: 1.96 GB without a budget).
    max_inflight_upload_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="Upload bytes held in memory at once, over all requests; a request that "
        "would pass it gets 503 overloaded with Retry-After. At least max_upload_bytes + 64 KiB.",
    )
    upload_timeout_s: float = Field(60.0, gt=0, description="Whole-upload deadline (408).")
    head_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="How long a connection may take to send a request's line and headers: "
        "from its start, or from the first byte of its next request (408, then closed).",
    )
    max_pixels: int = Field(50_000_000, gt=0, description="Largest width x height decoded (422).")
    min_side: int = Field(64, ge=1, description="Smallest accepted width or height (422).")
    # 16, not 32: with two model instances, 32 clients then form about three batches in flight
    # instead of two, so an instance finds the next batch waiting more often (3 of 3
    # alternating pairs, +4 to +14 % images/s at 32 clients; docs/benchmarks-history.md, round 7).
    batch_max_size: int = Field(16, ge=1, le=256, description="Micro-batch size limit.")
    batch_max_wait_ms: float = Field(3.0, ge=0, le=1000, description="Micro-batch gather wait.")
    queue_max: int = Field(256, ge=1, description="Queued predictions before 503 Retry-After.")
    max_inflight_per_key: int = Field(
        0,
        ge=0,
        description="Predictions one API key may have in flight (upload to answer); more are "
        "answered 429 too_many_requests with Retry-After, so one site cannot take every slot "
        "of the shared queues. 0 = no per-key limit.",
    )
    decode_workers: int = Field(2, ge=1, le=64, description="Threads decoding uploads.")
    model_threads: int = Field(
        1,
        ge=0,
        le=256,
        description="TensorFlow intra-op threads per model call (0 = TensorFlow's default, one "
        "per core). One thread per call, with one call per core (model_instances), was faster "
        "than one call spread over the cores for both /predict and explanations (README, "
        "Benchmarks).",
    )
    model_runtime: Literal["auto", "savedmodel"] = Field(
        "auto",
        description="auto: a version that has model.tflite is served by LiteRT (XNNPACK), "
        "checked against its SavedModel at load; savedmodel: always TensorFlow's runtime.",
    )
    model_instances: int = Field(
        0,
        ge=0,
        le=64,
        description="Model calls that may run at once (0 = one per CPU this process may use, "
        "by affinity and cgroup quota, at most 8); explanations split their LIME batches over "
        "as many threads.",
    )
    explain_workers: int = Field(1, ge=1, le=8, description="Concurrent LIME explanations.")
    explain_queue_max: int = Field(8, ge=1, description="Waiting explanations before 503.")
    explain_num_samples: int = Field(1000, ge=100, le=5000, description="Default LIME samples.")
    explain_num_features: int = Field(5, ge=1, le=20, description="Default LIME regions shown.")
    min_free_mb: int = Field(
        64,
        ge=0,
        description="/readyz answers 503 while the data directory's file system has less free "
        "space than this (0 = no check), so a load balancer stops sending images before audit "
        "writes fail.",
    )
    drain_seconds: float = Field(
        2.0,
        ge=0,
        le=120,
        description="After SIGTERM, keep answering this long with /readyz 503 (draining) "
        "before the listener closes, so load balancers stop routing here first "
        "(`pneumoscan serve` only).",
    )
    trained_age_years: str = Field(
        "1-5",
        description="Ages (completed years, LOW-HIGH) of the patients whose radiographs trained "
        "the model, used when its card does not record them (population.age_years): the "
        "shipped model's cohort was 1-5 (Kermany et al. 2018). A DICOM whose PatientAge (or "
        "birth date against the study date), or an upload whose X-Patient-Age header, falls "
        "outside is flagged or refused (age_outside). "
        "'off': no age check.",
    )
    age_outside: Literal["flag", "refuse"] = Field(
        "flag",
        description="A patient outside the trained ages (DICOM or X-Patient-Age): flag (scored, "
        "age_check "
        "outside) or refuse (422 age_outside_training).",
    )
    retention_hours: float = Field(24.0, gt=0, description="Keep stored images this long.")
    study_read_hold_days: float = Field(
        30.0,
        gt=0,
        le=3650,
        description="How long a study's read (PUT /studies/{uid}/reading) waits for images of "
        "the study scored after it (an outage's backlog, an image sent after the report).",
    )
    max_study_reads: int = Field(
        100_000,
        ge=0,
        description="Study reads held at most for studies with no scored image yet (about 150 "
        "bytes each); beyond, such a read is answered 404 and not held. 0: none is held.",
    )
    idempotency_hours: float = Field(
        24.0,
        gt=0,
        le=24 * 365,
        description="How long an Idempotency-Key replays its first prediction (POST /predict); "
        "after it, the same key makes a new one.",
    )
    poll_seconds: float = Field(5.0, gt=0, description="Model store poll interval.")
    cors_origins: str = Field("", description="Comma-separated CORS origins; empty = CORS off.")
    log_level: str = Field("INFO", description="Logging level.")
    tls_certfile: Path | None = Field(
        None,
        description="PEM certificate (chain) of this server: `pneumoscan serve` speaks HTTPS "
        "only (with tls_keyfile).",
    )
    tls_keyfile: Path | None = Field(None, description="PEM private key of tls_certfile.")
    tls_client_ca: Path | None = Field(
        None,
        description="PEM CA certificates: every client must present a certificate issued by "
        "one of them (mutual TLS), as well as an API key.",
    )
    tls_client_crl: Path | None = Field(
        None,
        description="PEM CRLs, one current CRL for every CA in tls_client_ca: a client "
        "certificate they revoke is refused (as is every certificate of a CA without a CRL "
        "here, or whose CRL is past its nextUpdate).",
    )

    tls_reload_seconds: float = Field(
        60.0,
        ge=0,
        description="How often the TLS files are checked for renewal and, when changed and "
        "valid, loaded without a restart (also at once on SIGHUP); 0: read at start only.",
    )

    @field_validator(
        "tls_certfile",
        "tls_keyfile",
        "tls_client_ca",
        "tls_client_crl",
        "api_keys_file",
        "reader_keys_file",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value  # `VAR=` in an env file or compose means unset

    @field_validator("trained_age_years")
    @classmethod
    def _age_range(cls, value: str) -> str:
        value = value.strip()
        if value.lower() in ("off", ""):
            return "off"
        AgeRange.parse(value)  # ValueError with the reason
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("log_level must be DEBUG, INFO, WARNING or ERROR")
        return value

    @model_validator(mode="after")
    def _largest_upload_fits_the_budget(self) -> Settings:
        if self.max_inflight_upload_bytes < self.max_upload_bytes + MULTIPART_OVERHEAD:
            raise ValueError(
                "max_inflight_upload_bytes must be at least max_upload_bytes + 65536, or the "
                "largest accepted upload could never be admitted"
            )
        return self

    @model_validator(mode="after")
    def _tls_complete(self) -> Settings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile are set together, or neither")
        if self.tls_client_ca is not None and self.tls_certfile is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_certfile and tls_keyfile")
        if self.tls_client_crl is not None and self.tls_client_ca is None:
            raise ValueError("tls_client_crl needs tls_client_ca (the CAs whose CRLs it holds)")
        return self

    @model_validator(mode="after")
    def _keys_strong_enough(self) -> Settings:
        for key in self.key_list:
            if len(key) < 16:
                raise ValueError("every PNEUMOSCAN_API_KEYS entry must be at least 16 characters")
        for key in self.reader_key_list:
            if len(key) < 16:
                raise ValueError(
                    "every PNEUMOSCAN_READER_KEYS entry must be at least 16 characters"
                )
        if set(self.key_list) & set(self.reader_key_list):
            raise ValueError(
                "a key is in both PNEUMOSCAN_API_KEYS and PNEUMOSCAN_READER_KEYS: give the RIS "
                "a key of its own"
            )
        return self

    @property
    def instances(self) -> int:
        """model_instances with 0 resolved to the CPUs this process may use (at most 8)."""
        if self.model_instances:
            return self.model_instances
        return max(1, min(8, usable_cpus()))

    @property
    def default_ages(self) -> AgeRange | None:
        """trained_age_years parsed; None when the age check is off."""
        return None if self.trained_age_years == "off" else AgeRange.parse(self.trained_age_years)

    def trained_ages(self, card_ages: AgeRange | None) -> AgeRange | None:
        """The ages a version is checked against: its card's, else trained_age_years; None
        when the age check is off. The one rule for the service and `pneumoscan check`."""
        if self.trained_age_years == "off":
            return None
        return card_ages or self.default_ages

    @property
    def key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @property
    def reader_key_list(self) -> list[str]:
        return [k.strip() for k in self.reader_keys.split(",") if k.strip()]

    @property
    def cors_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]
