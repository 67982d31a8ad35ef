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
    service's name, not 127.0.0.1). Under mutual TLS it presents the server's own
    certificate, which the service accepts when its CA is among PNEUMOSCAN_TLS_CLIENT_CA."""
    certfile = os.environ.get("PNEUMOSCAN_TLS_CERTFILE")
    if not certfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if os.environ.get("PNEUMOSCAN_TLS_CLIENT_CA"):
        context.load_cert_chain(certfile, os.environ.get("PNEUMOSCAN_TLS_KEYFILE") or None)
    return context


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    port = int(argv[0]) if argv else 8000
    try:
        context = probe_context()
        scheme = "http" if context is None else "https"
        url = f"{scheme}://127.0.0.1:{port}/readyz"
        with urllib.request.urlopen(url, timeout=4, context=context) as response:  # noqa: S310
            return 0 if response.status == 200 else 1
    except (OSError, ValueError, ssl.SSLError, urllib.error.URLError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
