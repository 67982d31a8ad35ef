"""uvicorn's server with a drain before its graceful shutdown.

On SIGTERM, uvicorn closes its listener at once, and a load balancer still routes to the
instance until its next probe finds it gone. So first, for `PNEUMOSCAN_DRAIN_SECONDS`, the
service keeps answering while /readyz says 503 `draining`; then uvicorn's own shutdown runs,
with idle keep-alive connections given a moment for a last request
(`BoundedHeadHttpToolsProtocol.shutdown`) instead of being closed under a request their client
had just sent.

Over HTTPS it also takes up renewed certificate files without a restart (`app.tls.
CertificateReloader`, every PNEUMOSCAN_TLS_RELOAD_SECONDS and on SIGHUP); SIGHUP also has the
key files read again (`app.security.KeyFileWatcher`). When the client CA or CRL file changes, the
open TLS connections close after their current answer, so that every client's certificate is
checked again against the changed files when it reconnects: a gateway revoked while its
keep-alive connection was busy would otherwise go on sending over it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket

import uvicorn

from app import lifecycle
from app.settings import Settings
from app.tls import CertificateReloader, TlsFileError, TlsFiles

log = logging.getLogger("pneumoscan")


class DrainingServer(uvicorn.Server):
    def __init__(
        self, config: uvicorn.Config, drain_seconds: float, settings: Settings | None = None
    ) -> None:
        super().__init__(config)
        self.drain_seconds = drain_seconds
        self.settings = settings
        self.certificates: CertificateReloader | None = None
        self._reloading: asyncio.Task | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        settings = self.settings
        files = TlsFiles.of(settings) if settings is not None else None
        if self.config.ssl is not None and files is not None:
            # Before the listener opens: every handshake is served from the reloader's context
            # (the client CRL, and files changed since), never from uvicorn's own (app/tls.py).
            try:
                self.certificates = CertificateReloader(
                    self.config.ssl, files, settings.tls_reload_seconds, self.config.ssl_ciphers
                )
            except TlsFileError as exc:  # changed since the check before start
                log.error("%s", exc)
                self.should_exit = True
                return
            self.certificates.on_trust_change = self.verify_clients_again
        await super().startup(sockets)
        if self.started and self.certificates is not None and settings.tls_reload_seconds > 0:
            # Changed files are taken up without a restart.
            self._reloading = asyncio.create_task(self.certificates.run())
        if self.started:
            # SIGHUP: certificates and key files are checked at once (and the service goes on)
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)

    def verify_clients_again(self) -> None:
        """Close the open TLS connections after their current answer (an idle one after
        `IDLE_GRACE_S`, for a request its client may have just sent), as at shutdown. A TLS
        connection's client certificate is checked once, in its handshake, and neither TLS 1.3
        nor Python can check it again on an open connection."""
        closing = 0
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is None or transport.is_closing():
                continue
            if transport.get_extra_info("ssl_object") is None:
                continue
            connection.shutdown()
            closing += 1
        log.info(
            "client CA or CRL file changed: %d open TLS connection(s) close after their "
            "current answer, so each client's certificate is checked again when it reconnects",
            closing,
        )

    def reload(self) -> None:
        if self._reloading is not None and self.certificates is not None:
            self.certificates.wake()
        for wake in list(lifecycle.reload_listeners):
            wake()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        lifecycle.draining = True
        if self._reloading is not None:
            self._reloading.cancel()
        if self.drain_seconds > 0 and not self.force_exit:
            log.info(
                "SIGTERM: /readyz answers 503 draining; the listener closes in %.1f s",
                self.drain_seconds,
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.drain_seconds
            while loop.time() < deadline and not self.force_exit:  # a second Ctrl+C ends it
                await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        await super().shutdown(sockets)
