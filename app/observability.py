"""Prometheus metrics, structured JSON logs with a request id, and the ASGI middleware that
times requests and adds security headers. Nothing here logs bodies, file names or DICOM tags."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import time
import traceback
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (
        b"content-security-policy",
        b"default-src 'none'; img-src 'self' data:; "
        b"style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
        b"script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; frame-ancestors 'none'",
    ),
]


HSTS = (b"strict-transport-security", b"max-age=31536000")


class Metrics:
    """One registry per app instance, so tests can build several apps in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pneumoscan_requests_total",
            "HTTP requests",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pneumoscan_request_duration_seconds",
            "HTTP request latency",
            ["route", "method", "status"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.predictions = Counter(
            "pneumoscan_predictions_total",
            "Predictions by label",
            ["label", "model_version"],
            registry=self.registry,
        )
        self.idempotent_replays = Counter(
            "pneumoscan_idempotent_replays_total",
            "Answers given again for a retried Idempotency-Key instead of a second prediction "
            "(a gateway losing answers: timeouts, resets)",
            registry=self.registry,
        )
        self.out_of_distribution = Counter(
            "pneumoscan_out_of_distribution_total",
            "Predictions whose input was flagged as unlike the training radiographs; a rising "
            "share means the images sent have changed (new equipment, wrong export settings)",
            ["model_version"],
            registry=self.registry,
        )
        self.age_checks = Counter(
            "pneumoscan_age_checks_total",
            "Predictions by the patient's age against the model's trained ages: within, "
            "outside (probabilities from a population the model never saw) or unknown (JPEG, "
            "PNG, or a DICOM without a readable age)",
            ["status", "model_version"],
            registry=self.registry,
        )
        self.model_version = Gauge(
            "pneumoscan_model_version", "Model version serving", ["model"], registry=self.registry
        )
        self.explain_seconds = Histogram(
            "pneumoscan_explain_duration_seconds",
            "LIME explanation compute time",
            registry=self.registry,
            buckets=(0.25, 0.5, 1, 2, 3, 5, 10, 30, 60),
        )
        self.batch_size = Histogram(
            "pneumoscan_batch_size",
            "Images per model call",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.queue_depth = Gauge(
            "pneumoscan_queue_depth", "Predictions waiting for the model", registry=self.registry
        )
        self.data_free_bytes = Gauge(
            "pneumoscan_data_dir_free_bytes",
            "Free space on the file system of PNEUMOSCAN_DATA_DIR (audit records, images)",
            registry=self.registry,
        )
        self.ready = Gauge(
            "pneumoscan_ready",
            "1 while /readyz would answer 200 (a model serves and audit records can be written)",
            registry=self.registry,
        )
        self.readings = Gauge(
            "pneumoscan_readings",
            "Images read by radiologists (PUT /predictions/{id}/reading, PUT /studies/{uid}/"
            "reading), by the model's call and the read, once per image and model version (its "
            "latest read); from the audit database, so restarts do not reset it. database: "
            "the audit database's id, the same from every instance sharing it (count reads "
            "with max by database, then sum)",
            ["database", "model_version", "model_label", "reader_label"],
            registry=self.registry,
        )
        self.audit_write_failing = Gauge(
            "pneumoscan_audit_write_failing",
            "1 while the last audit write failed (predictions answer 503 storage_unavailable)",
            registry=self.registry,
        )
        self.tls_expiry = Gauge(
            "pneumoscan_tls_certificate_expiry_timestamp_seconds",
            "When the certificate served over HTTPS (certificate=server), or the first of the "
            "client CAs accepted for mutual TLS (certificate=client_ca), expires, in Unix time; "
            "absent without TLS. Follows renewed files as they are taken up",
            ["certificate"],
            registry=self.registry,
        )
        self.tls_crl_next_update = Gauge(
            "pneumoscan_tls_crl_next_update_timestamp_seconds",
            "The earliest nextUpdate among the CRLs in PNEUMOSCAN_TLS_CLIENT_CRL, in Unix time "
            "(crl=client); absent without one. Past it, OpenSSL refuses every client "
            "certificate of that CA until a newer CRL is installed",
            ["crl"],
            registry=self.registry,
        )
        self.tls_files_failing = Gauge(
            "pneumoscan_tls_files_failing",
            "1 while changed TLS files (certificate, key, client CAs, CRLs) cannot be loaded: "
            "the previous ones keep serving, so a renewal, a CA removal or a revocation is not "
            "in force",
            registry=self.registry,
        )
        self.key_files_failing = Gauge(
            "pneumoscan_key_files_failing",
            "1 while a changed PNEUMOSCAN_API_KEYS_FILE or PNEUMOSCAN_READER_KEYS_FILE cannot be "
            "used: the previous keys stay in force, including any the change revoked (0 without "
            "key files)",
            registry=self.registry,
        )
        self.rejected = Counter(
            "pneumoscan_rejected_total",
            "Requests refused by limits",
            ["reason"],
            registry=self.registry,
        )


# Loggers whose messages can quote an upload's DICOM attributes: pydicom ("Invalid value for VR
# DA: '<birth date>'"), highdicom (a patient's name), and Python warnings, which quote whatever a
# library warned about. Their records keep the logger, level and source line; the text is
# withheld, as an exception's message is (exc_where).
WITHHELD_LOGGERS = ("pydicom", "highdicom", "py.warnings")
_WARNING_WHERE = re.compile(r"^(?P<file>.*?):(?P<line>\d+): (?P<category>\w+):")


def withheld_message(record: logging.LogRecord) -> str | None:
    """The text to log instead of the record's message, or None to log the message."""
    if not any(
        record.name == name or record.name.startswith(f"{name}.") for name in WITHHELD_LOGGERS
    ):
        return None
    where = f"{Path(record.pathname).name}:{record.lineno}"
    kind = record.levelname.lower()
    if record.name == "py.warnings":  # the message is "path:line: Category: text"
        match = _WARNING_WHERE.match(record.getMessage())
        if match:
            where = f"{Path(match['file']).name}:{match['line']}"
            kind = match["category"]
    return f"{record.name} {kind} at {where} (text withheld: it can quote patient attributes)"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": withheld_message(record) or record.getMessage(),
            "request_id": request_id_var.get(),
        }
        for key in (
            "route",
            "method",
            "status",
            "duration_ms",
            "key_id",
            "prediction_id",
            "model_version",
            "label",
            "ood_flagged",
            "age_check",
            "answer",
            "reader_label",
        ):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            kind, _, trace = record.exc_info
            entry["exc_type"] = kind.__name__ if kind else None
            # Where it happened, never what it said: an exception's message can quote an upload.
            entry["exc_where"] = [
                f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
                for frame in traceback.extract_tb(trace)[-8:]
            ]
        return json.dumps(entry)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("pneumoscan")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def uvicorn_log_config(level: str) -> dict:
    """For `pneumoscan serve`: uvicorn's own records (a malformed request, an exception that
    escaped the app, a shutdown that timed out) and any library's warnings as the same JSON
    lines as the service's, instead of plain text (a library logger without a handler writes
    its bare message to stderr). uvicorn's access log is off: ObservabilityMiddleware writes
    one per request. python-multipart's per-request warnings about a malformed body are
    dropped: the client gets a 4xx that says so, and a hostile client must not fill the log."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": level.upper(), "propagate": False},
            "uvicorn.access": {"handlers": [], "level": level.upper(), "propagate": False},
            "python_multipart": {"level": "ERROR"},
            "multipart": {"level": "ERROR"},  # its name before python-multipart 0.0.13
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
    }


access_log = logging.getLogger("pneumoscan.access")


class ObservabilityMiddleware:
    """Pure ASGI: request id, timing, metrics by route template, access log, security headers."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _SAFE_ID.match(incoming) else os.urandom(8).hex()
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in SECURITY_HEADERS if h[0] not in present)
                if scope.get("scheme") == "https":  # served over TLS: browsers keep to it
                    headers.append(HSTS)
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            status = str(status_holder["status"])
            duration = time.perf_counter() - started
            self.metrics.requests.labels(template, scope["method"], status).inc()
            self.metrics.latency.labels(template, scope["method"], status).observe(duration)
            if template not in ("/metrics", "/healthz", "/readyz"):
                access_log.info(
                    "request",
                    extra={
                        "route": template,
                        "method": scope["method"],
                        "status": int(status),
                        "duration_ms": round(duration * 1000, 2),
                    },
                )
            request_id_var.reset(token)
