"""HTTPS for `pneumoscan serve`: the server's certificate and, for mutual TLS, the CAs whose
client certificates are accepted. A hospital network is not a trusted one: API keys and DICOM
objects (patient data) should not cross it in clear text, so terminate TLS here or in a proxy
in front (README, "Security")."""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.file_watch import FileWatcher
from app.settings import Settings

log = logging.getLogger("pneumoscan.tls")

# When the certificates this process serves with stop being valid (Unix time), by role: "server"
# (the certificate new connections are shown) and "client_ca" (the earliest expiry in
# PNEUMOSCAN_TLS_CLIENT_CA). Set at start and at each reload; /metrics exports it as
# pneumoscan_tls_certificate_expiry_timestamp_seconds, for an alert weeks before a renewal that
# did not happen turns into every PACS refusing the service.
expiry: dict[str, float] = {}
# A renewal is due long before this; an ACME client renews at 30 days left.
EXPIRY_WARNING_DAYS = 14


def uvicorn_tls_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.run's keyword arguments for the TLS settings; empty for plain HTTP. Python's
    server context accepts TLS 1.2 and 1.3 only."""
    if settings.tls_certfile is None or settings.tls_keyfile is None:
        return {}
    options: dict[str, Any] = {
        "ssl_certfile": str(settings.tls_certfile),
        "ssl_keyfile": str(settings.tls_keyfile),
    }
    if settings.tls_client_ca is not None:
        options["ssl_ca_certs"] = str(settings.tls_client_ca)
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


def tls_problem(settings: Settings) -> str | None:
    """Why the TLS files cannot serve, in one line (before uvicorn starts and would say it in a
    traceback), or None; also None when TLS is off."""
    if settings.tls_certfile is None or settings.tls_keyfile is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.tls_certfile, settings.tls_keyfile)
    except (OSError, ssl.SSLError) as exc:
        return (
            "PNEUMOSCAN_TLS_CERTFILE / PNEUMOSCAN_TLS_KEYFILE cannot be used (PEM certificate "
            f"chain and its matching private key, readable by this user): {_reason(exc)}"
        )
    if settings.tls_client_ca is not None:
        try:
            context.load_verify_locations(cafile=settings.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            return (
                "PNEUMOSCAN_TLS_CLIENT_CA cannot be used (PEM CA certificates, readable by this "
                f"user): {_reason(exc)}"
            )
    return None


def certificate_expiry(certfile: Path) -> float | None:
    """The notAfter (Unix time) of the first certificate in a PEM file: the server's own, before
    its chain. None where it cannot be read (the file is then refused elsewhere, with a reason)."""
    # The standard library decodes a certificate only through this helper (the ssl module's own
    # tests use it) or from a live connection; the serving install carries no X.509 parser.
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decode is None:
        return None
    try:
        return float(ssl.cert_time_to_seconds(decode(str(certfile))["notAfter"]))
    except (OSError, ssl.SSLError, KeyError, ValueError):
        return None


def earliest_ca_expiry(context: ssl.SSLContext) -> float | None:
    """The first notAfter (Unix time) among the CA certificates loaded into `context`."""
    times = [
        float(ssl.cert_time_to_seconds(ca["notAfter"]))
        for ca in context.get_ca_certs()
        if "notAfter" in ca
    ]
    return min(times) if times else None


def record_expiry(server: float | None, client_ca: float | None) -> None:
    """Keep the served certificates' expiry for /metrics, and say in the log when one has
    expired or will within EXPIRY_WARNING_DAYS."""
    expiry.clear()
    for role, when, setting in (
        ("server", server, "PNEUMOSCAN_TLS_CERTFILE"),
        ("client_ca", client_ca, "PNEUMOSCAN_TLS_CLIENT_CA"),
    ):
        if when is None:
            continue
        expiry[role] = when
        left = when - time.time()
        date = datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M UTC")
        if left <= 0:
            log.error(
                "the certificate in %s expired on %s: clients that check certificates refuse "
                "this service; install a renewed one (taken up without a restart)",
                setting,
                date,
            )
        elif left < EXPIRY_WARNING_DAYS * 86400:
            log.warning(
                "the certificate in %s expires on %s (in %.0f days): renew it",
                setting,
                date,
                left / 86400,
            )


def record_files_expiry(settings: Settings) -> None:
    """record_expiry for the files the settings name (at start, as uvicorn loaded them)."""
    if settings.tls_certfile is None:
        return
    client_ca = None
    if settings.tls_client_ca is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_verify_locations(cafile=settings.tls_client_ca)
            client_ca = earliest_ca_expiry(context)
        except (OSError, ssl.SSLError):
            client_ca = None
    record_expiry(certificate_expiry(settings.tls_certfile), client_ca)


def _copy_private(path: Path, folder: Path) -> Path:
    """A copy of `path` in `folder`, readable by this user only."""
    copy = folder / f"{len(list(folder.iterdir()))}.pem"
    descriptor = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(path.read_bytes())
    return copy


def _load(
    context: ssl.SSLContext, certfile: Path, keyfile: Path, client_ca: Path | None = None
) -> None:
    context.load_cert_chain(certfile, keyfile)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)


def _reason(exc: OSError | ssl.SSLError) -> str:
    return exc.strerror or getattr(exc, "reason", None) or str(exc) or type(exc).__name__


class CertificateReloader(FileWatcher):
    """Puts renewed certificate files into the live server context, without a restart.

    Hospitals renew certificates (yearly, or every 60-90 days with an ACME client or
    cert-manager, which replace the files and send no signal). Every `interval` seconds, and at
    once on SIGHUP, the files' identity (inode, size, modification time) is compared with the
    last one loaded. Changed files are first loaded into a scratch context; only if the pair
    (and the client CA file) load there are they loaded into the serving context, whose new
    handshakes then present them. Open connections keep the certificate they were made with.
    A half-written pair (the certificate renewed, the key not yet) is logged once and retried
    at the next check, while the old pair keeps serving. A CA added to the client CA file is
    trusted from the reload on; one removed stays trusted until a restart (OpenSSL's store only
    grows).
    """

    log = log
    what = "TLS certificate"

    def __init__(self, context: ssl.SSLContext, settings: Settings, interval: float) -> None:
        assert settings.tls_certfile is not None and settings.tls_keyfile is not None
        super().__init__(interval)
        self.context = context
        self.certfile, self.keyfile = settings.tls_certfile, settings.tls_keyfile
        self.client_ca = settings.tls_client_ca
        self.loaded = self.identity()
        self.reloads = 0
        self._refused: tuple | None = None  # the identity last refused, logged once

    def files(self) -> list[Path]:
        return [self.certfile, self.keyfile] + ([self.client_ca] if self.client_ca else [])

    def check(self) -> bool:
        """Load the files if they changed and load cleanly; True when they were loaded."""
        current = self.identity()
        if current == self.loaded:
            return False
        # One snapshot of the files' bytes is both validated and loaded: loading the live
        # context from the paths again could read a pair replaced in between, and a failed
        # load leaves OpenSSL with the new certificate and the old key. The copies live in a
        # private (0700) temporary folder (tmpfs in the container) for milliseconds.
        with tempfile.TemporaryDirectory(prefix="pneumoscan-tls-") as folder:
            try:
                snapshot = [_copy_private(path, Path(folder)) for path in self.files()]
                scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                _load(scratch, *snapshot)
            except (OSError, ssl.SSLError) as exc:
                if current != self._refused:
                    self._refused = current
                    log.warning(
                        "renewed TLS files not loaded, the previous certificate keeps serving "
                        "(retried at the next check): %s",
                        _reason(exc),
                    )
                return False
            _load(self.context, *snapshot)
            server_expiry = certificate_expiry(snapshot[0])
        client_ca_expiry = earliest_ca_expiry(scratch) if self.client_ca is not None else None
        record_expiry(server_expiry, client_ca_expiry)
        self.loaded, self._refused = current, None
        self.reloads += 1
        log.info("TLS certificate files reloaded: new connections present the renewed ones")
        return True
