"""`python -m app.healthcheck [port]`: exit 0 when the service on this host answers /readyz
with 200, else 1; the container's HEALTHCHECK. Standard library only (it starts every few
seconds). Over HTTPS when PNEUMOSCAN_TLS_CERTFILE is set."""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request


def probe_context() -> ssl.SSLContext | None:
    """None for plain HTTP. With TLS, the probe checks that this host's own process is alive
    and ready, not who it is, so it does not verify the certificate (it was issued for the
    service's name, not 127.0.0.1). Under mutual TLS it must present a client certificate the
    service accepts: PNEUMOSCAN_HEALTHCHECK_CERT (and _KEY), or else the server's own, which
    is accepted only when its CA is in PNEUMOSCAN_TLS_CLIENT_CA and its Extended Key Usage
    includes clientAuth (many server certificates have serverAuth alone)."""
    certfile = os.environ.get("PNEUMOSCAN_TLS_CERTFILE")
    if not certfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if os.environ.get("PNEUMOSCAN_TLS_CLIENT_CA"):
        probe_cert = os.environ.get("PNEUMOSCAN_HEALTHCHECK_CERT")
        probe_key = os.environ.get("PNEUMOSCAN_HEALTHCHECK_KEY")
        if not probe_cert:
            probe_cert, probe_key = certfile, os.environ.get("PNEUMOSCAN_TLS_KEYFILE")
        context.load_cert_chain(probe_cert, probe_key or None)
    return context


# Said when a probe under mutual TLS is refused (Docker keeps the probe's output in
# `docker inspect`'s health log).
REFUSED_HINT = (
    "under mutual TLS the probe presents PNEUMOSCAN_HEALTHCHECK_CERT, or else the server's own "
    "certificate, which the service refuses unless its CA is in PNEUMOSCAN_TLS_CLIENT_CA and its "
    "Extended Key Usage includes clientAuth: set PNEUMOSCAN_HEALTHCHECK_CERT and "
    "PNEUMOSCAN_HEALTHCHECK_KEY to a client certificate the service accepts"
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    port = int(argv[0]) if argv else 8000
    mutual = bool(os.environ.get("PNEUMOSCAN_TLS_CERTFILE")) and bool(
        os.environ.get("PNEUMOSCAN_TLS_CLIENT_CA")
    )
    try:
        context = probe_context()
        scheme = "http" if context is None else "https"
        url = f"{scheme}://127.0.0.1:{port}/readyz"
        with urllib.request.urlopen(url, timeout=4, context=context) as response:  # noqa: S310
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as exc:
        print(f"pneumoscan healthcheck: /readyz answered {exc.code}", file=sys.stderr)
        return 1
    except (OSError, ValueError, ssl.SSLError, urllib.error.URLError) as exc:
        reason = getattr(exc, "reason", None) or exc
        refused = isinstance(reason, ssl.SSLError | ConnectionResetError | BrokenPipeError)
        hint = f" ({REFUSED_HINT})" if mutual and refused else ""
        print(f"pneumoscan healthcheck: {type(reason).__name__}: {reason}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
