"""HTTPS for `pneumoscan serve`: the server's certificate and, for mutual TLS, the CAs whose
client certificates are accepted. A hospital network is not a trusted one: API keys and DICOM
objects (patient data) should not cross it in clear text, so terminate TLS here or in a proxy
in front (README, "Security")."""

from __future__ import annotations

import ssl
from typing import Any

from app.settings import Settings


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


def _reason(exc: OSError | ssl.SSLError) -> str:
    return exc.strerror or getattr(exc, "reason", None) or str(exc) or type(exc).__name__
