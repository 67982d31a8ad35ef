"""HTTPS for `pneumoscan serve`: the server's certificate and, for mutual TLS, the CAs whose
client certificates are accepted. A hospital network is not a trusted one: API keys and DICOM
objects (patient data) should not cross it in clear text, so terminate TLS here or in a proxy
in front (README, "Security")."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


class Watch:
    """What /metrics says about the TLS files beside their certificates' expiry."""

    # The earliest nextUpdate (Unix time) among the CRLs in PNEUMOSCAN_TLS_CLIENT_CRL: past it,
    # OpenSSL refuses every client certificate of that CA until a newer CRL is installed.
    crl_next_update: float | None = None
    # True while changed TLS files cannot be loaded (the previous ones keep serving): a renewal
    # or a revocation that is not in force.
    reload_failing: bool = False


watch = Watch()
# A CA publishes its next CRL before the current one's nextUpdate; a day left means it did not.
CRL_WARNING_SECONDS = 86400


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


@dataclass(frozen=True)
class TlsFiles:
    """The files one serving context is made from."""

    certfile: Path
    keyfile: Path
    client_ca: Path | None = None
    client_crl: Path | None = None

    @classmethod
    def of(cls, settings: Settings) -> TlsFiles | None:
        if settings.tls_certfile is None or settings.tls_keyfile is None:
            return None
        return cls(
            settings.tls_certfile,
            settings.tls_keyfile,
            settings.tls_client_ca,
            settings.tls_client_crl,
        )

    def paths(self) -> list[Path]:
        named = (self.certfile, self.keyfile, self.client_ca, self.client_crl)
        return [path for path in named if path is not None]


class TlsFileError(Exception):
    """A TLS file that cannot serve, said by its setting (never by its contents)."""

    def __init__(self, setting: str, expected: str, reason: str) -> None:
        super().__init__(f"{setting} cannot be used ({expected}): {reason}")


def server_context(files: TlsFiles, ciphers: str | None = None) -> ssl.SSLContext:
    """A server context made from `files` (TlsFileError naming the setting at fault). Under
    mutual TLS, clients must present a certificate from a CA in the client CA file and, with a
    CRL file, one its CA has not revoked."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.certfile, files.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise TlsFileError(
            "PNEUMOSCAN_TLS_CERTFILE / PNEUMOSCAN_TLS_KEYFILE",
            "PEM certificate chain and its matching private key, readable by this user",
            _reason(exc),
        ) from None
    if files.client_ca is not None:
        try:
            context.load_verify_locations(cafile=files.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsFileError(
                "PNEUMOSCAN_TLS_CLIENT_CA",
                "PEM CA certificates, readable by this user",
                _reason(exc),
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
        without_resumption(context)
    if files.client_crl is not None:
        expected = "PEM CRLs of the client CAs, and nothing else, readable by this user"
        try:
            crl_next_updates(files.client_crl.read_bytes())  # only CRLs: a CA here is trusted
            context.load_verify_locations(cafile=files.client_crl)
        except (OSError, ssl.SSLError, ValueError) as exc:
            reason = _reason(exc) if isinstance(exc, OSError | ssl.SSLError) else str(exc)
            raise TlsFileError("PNEUMOSCAN_TLS_CLIENT_CRL", expected, reason) from None
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if ciphers:
        context.set_ciphers(ciphers)
    return context


def without_resumption(context: ssl.SSLContext) -> None:
    """No TLS session resumption: a resumed session skips the client certificate check, so a
    client whose CA was removed or whose certificate was revoked could go on resuming the
    session it had (for the ticket's lifetime, 2 h). Gateways keep their connections open, so
    a full handshake per new connection costs little."""
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0


def tls_problem(settings: Settings) -> str | None:
    """Why the TLS files cannot serve, in one line (before uvicorn starts and would say it in a
    traceback), or None; also None when TLS is off."""
    files = TlsFiles.of(settings)
    if files is None:
        return None
    try:
        server_context(files)
    except TlsFileError as exc:
        return str(exc)
    return None


_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL | re.ASCII
)


def crl_next_updates(pem: bytes) -> list[float | None]:
    """The nextUpdate (Unix time, None where a CRL states none) of each CRL in a PEM file.
    ValueError for a file with no CRL or with anything else in it (a certificate in the CRL
    file would be trusted as a CA), or a CRL whose fields cannot be read."""
    blocks = _PEM_BLOCK.findall(pem)
    if not blocks:
        raise ValueError("no PEM CRL (-----BEGIN X509 CRL-----) found")
    times = []
    for number, (kind, body) in enumerate(blocks, start=1):
        if kind != b"X509 CRL":
            raise ValueError(f"PEM block {number} is a {kind.decode()}, not an X509 CRL")
        try:
            der = base64.b64decode(body, validate=False)
            times.append(crl_next_update(der))
        except (ValueError, IndexError) as exc:
            raise ValueError(f"PEM block {number} is not a readable CRL ({exc})") from None
    return times


def _der_elements(der: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(tag, first content byte, end of content) of each DER element in der[start:end]."""
    while start < end:
        if start + 2 > end:
            raise ValueError("truncated DER element")
        tag, length = der[start], der[start + 1]
        start += 2
        if length & 0x80:
            size = length & 0x7F
            if not 1 <= size <= 4 or start + size > end:
                raise ValueError("bad DER length")
            length = int.from_bytes(der[start : start + size], "big")
            start += size
        if start + length > end:
            raise ValueError("truncated DER element")
        yield tag, start, start + length
        start += length


_SEQUENCE, _INTEGER, _UTC_TIME, _GENERALIZED_TIME = 0x30, 0x02, 0x17, 0x18


def crl_next_update(der: bytes) -> float | None:
    """A DER CRL's nextUpdate (RFC 5280 5.1: CertificateList = SEQUENCE {tbsCertList = SEQUENCE
    {version INTEGER OPTIONAL, signature, issuer, thisUpdate Time, nextUpdate Time OPTIONAL,
    ...}, ...}), or None when it has none. The serving install has no X.509 parser; this reads
    only these fields (the CRL's signature is OpenSSL's to check)."""
    outer = list(_der_elements(der, 0, len(der)))
    if len(outer) != 1 or outer[0][0] != _SEQUENCE:
        raise ValueError("not a DER SEQUENCE")
    tbs = next(_der_elements(der, outer[0][1], outer[0][2]))
    if tbs[0] != _SEQUENCE:
        raise ValueError("no tbsCertList")
    fields = list(_der_elements(der, tbs[1], tbs[2]))
    if fields and fields[0][0] == _INTEGER:
        fields = fields[1:]
    if len(fields) < 3 or fields[2][0] not in (_UTC_TIME, _GENERALIZED_TIME):
        raise ValueError("no thisUpdate")
    if len(fields) < 4 or fields[3][0] not in (_UTC_TIME, _GENERALIZED_TIME):
        return None
    tag, start, end = fields[3]
    text = der[start:end].decode("ascii")
    if not re.fullmatch(r"[0-9]{12}Z" if tag == _UTC_TIME else r"[0-9]{14}Z", text):
        raise ValueError("nextUpdate is not a UTC time")
    if tag == _UTC_TIME:  # RFC 5280 4.1.2.5.1: YY >= 50 is 19YY
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    moment = datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)
    return moment.timestamp()


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


def record_expiry(
    server: float | None, client_ca: float | None, crl_next_update: float | None = None
) -> None:
    """Keep the served certificates' expiry and the CRLs' next update for /metrics, and say in
    the log when a certificate has expired or will within EXPIRY_WARNING_DAYS, and when a CRL
    is past its next update or will be within a day."""
    expiry.clear()
    for role, when, setting in (
        ("server", server, "PNEUMOSCAN_TLS_CERTFILE"),
        ("client_ca", client_ca, "PNEUMOSCAN_TLS_CLIENT_CA"),
    ):
        if when is None:
            continue
        expiry[role] = when
        left = when - time.time()
        date = _date(when)
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
    watch.crl_next_update = crl_next_update
    if crl_next_update is None:
        return
    left = crl_next_update - time.time()
    if left <= 0:
        log.error(
            "a CRL in PNEUMOSCAN_TLS_CLIENT_CRL was due to be replaced on %s: every client "
            "certificate of its CA is refused until a newer CRL is in the file (taken up "
            "without a restart)",
            _date(crl_next_update),
        )
    elif left < CRL_WARNING_SECONDS:
        log.warning(
            "a CRL in PNEUMOSCAN_TLS_CLIENT_CRL is due to be replaced on %s (in %.1f h); after "
            "that its CA's client certificates are refused: install its newer CRL",
            _date(crl_next_update),
            left / 3600,
        )


def refuse_non_ascii_server_names_quietly() -> None:
    """Python decodes the server name (SNI) as ASCII before calling the SNI callback; a client
    sending another (RFC 6066 names are ASCII A-labels, so only a broken or hostile client)
    has its handshake refused, and Python prints the decoding error with the client's bytes to
    stderr, outside the JSON log, once per such ClientHello. This hook logs the first one per
    process as a warning without the bytes, the rest at DEBUG; any other unraisable exception
    goes to the previous hook."""
    if getattr(sys.unraisablehook, "pneumoscan_sni", False):
        return
    previous = sys.unraisablehook
    seen = [0]

    def hook(unraisable: Any) -> None:
        frames = []
        trace = unraisable.exc_traceback
        while trace is not None:
            frames.append(trace.tb_frame.f_code.co_name)
            trace = trace.tb_next
        if not (
            unraisable.exc_type is UnicodeDecodeError
            and isinstance(unraisable.object, bytes)
            and frames[-1:] == ["do_handshake"]
        ):
            previous(unraisable)
            return
        seen[0] += 1
        log.log(
            logging.WARNING if seen[0] == 1 else logging.DEBUG,
            "refused a TLS handshake whose server name (SNI) is not ASCII (%d so far); "
            "further ones are logged at DEBUG",
            seen[0],
        )

    hook.pneumoscan_sni = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _date(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _copy_private(path: Path, folder: Path) -> Path:
    """A copy of `path` in `folder`, readable by this user only."""
    copy = folder / f"{len(list(folder.iterdir()))}.pem"
    descriptor = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(path.read_bytes())
    return copy


def _reason(exc: OSError | ssl.SSLError) -> str:
    return exc.strerror or getattr(exc, "reason", None) or str(exc) or type(exc).__name__


class CertificateReloader(FileWatcher):
    """Serves every TLS handshake from a context made from the current files, and makes a new
    one when they change, without a restart.

    Hospitals renew certificates (yearly, or every 60-90 days with an ACME client or
    cert-manager, which replace the files and send no signal), remove a CA from the client CA
    file and publish new CRLs. Every `interval` seconds, and at once on SIGHUP, the files'
    identity (inode, size, modification time) is compared with the last one loaded. Changed
    files are copied once and a fresh context is made from the copies; only if everything loads
    does it replace the current one. The listening context (uvicorn's) hands each new
    handshake to the current context in its SNI callback, which OpenSSL calls for every
    ClientHello, with or without a server name; that switch takes the certificate, the CA store
    and the CRLs, so a CA removed or a certificate revoked is refused from the next handshake
    (OpenSSL's stores only grow, so loading into the live context could not remove anything).
    A certificate is only checked in a handshake, so when the client CA or CRL file changes,
    `on_trust_change` has the open connections closed after their current answer (as nginx's
    reload does), and each client's certificate is checked again when it reconnects; a server
    certificate's renewal leaves them open. A half-written pair (the certificate
    renewed, the key not yet) is logged once, sets `watch.reload_failing` and is retried at the
    next check, while the previous context keeps serving.
    """

    log = log
    what = "TLS certificate"

    def __init__(
        self, live: ssl.SSLContext, files: TlsFiles, interval: float, ciphers: str | None = None
    ) -> None:
        super().__init__(interval)
        self.tls_files, self.ciphers = files, ciphers
        self.loaded = self.identity()
        # TlsFileError at start: the files were checked before
        self.current, self._trust = self._load()
        self.reloads = 0
        self._refused: tuple | None = None  # the identity last refused, logged once
        # Called on the event loop when a reload changed the client CA or CRL file.
        self.on_trust_change: Callable[[], None] | None = None
        self._trust_changed = False
        watch.reload_failing = False
        # A handshake switched to another context keeps the options, verification mode and
        # flags the listening context gave it; the switch brings the certificate and the stores.
        if files.client_ca is not None:
            without_resumption(live)
        if files.client_crl is not None:
            live.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        live.sni_callback = self._handshake
        refuse_non_ascii_server_names_quietly()

    def _handshake(self, connection: Any, server_name: str | None, live: ssl.SSLContext) -> None:
        connection.context = self.current

    def files(self) -> list[Path]:
        return self.tls_files.paths()

    def _load(self) -> tuple[ssl.SSLContext, bytes]:
        """A context from one snapshot of the files' bytes, with their expiry recorded: reading
        the paths again could see a pair replaced in between. The copies live in a private
        (0700) temporary folder (tmpfs in the container) for milliseconds."""
        with tempfile.TemporaryDirectory(prefix="pneumoscan-tls-") as folder:
            try:
                copies = {path: _copy_private(path, Path(folder)) for path in self.files()}
            except OSError as exc:
                raise TlsFileError("a TLS file", "readable by this user", _reason(exc)) from None
            files = self.tls_files
            snapshot = TlsFiles(
                copies[files.certfile],
                copies[files.keyfile],
                copies.get(files.client_ca) if files.client_ca else None,
                copies.get(files.client_crl) if files.client_crl else None,
            )
            context = server_context(snapshot, self.ciphers)
            # what the client certificates are checked against, by content: a CRL rewritten
            # unchanged (a cron job fetching it hourly) or a touched file changes nothing
            trust = hashlib.sha256()
            for path in (snapshot.client_ca, snapshot.client_crl):
                trust.update(path.read_bytes() if path is not None else b"")
                trust.update(b"\0")
            server_expiry = certificate_expiry(snapshot.certfile)
            crl_times = (
                [t for t in crl_next_updates(snapshot.client_crl.read_bytes()) if t is not None]
                if snapshot.client_crl is not None
                else []
            )
        client_ca_expiry = earliest_ca_expiry(context) if files.client_ca is not None else None
        record_expiry(server_expiry, client_ca_expiry, min(crl_times) if crl_times else None)
        return context, trust.digest()

    def check(self) -> bool:
        """Make a new context if the files changed and load cleanly; True when one was made."""
        current = self.identity()
        if current == self.loaded:
            return False
        try:
            context, trust = self._load()
        except TlsFileError as exc:
            watch.reload_failing = True
            if current != self._refused:
                self._refused = current
                log.warning(
                    "changed TLS files not loaded, the previous ones keep serving (retried at "
                    "the next check): %s",
                    exc,
                )
            return False
        self.current = context
        self._trust_changed = self.tls_files.client_ca is not None and trust != self._trust
        self._trust = trust
        self.loaded, self._refused = current, None
        watch.reload_failing = False
        self.reloads += 1
        log.info("TLS files reloaded: new connections are served with the changed ones")
        return True

    def changed(self) -> None:
        if self._trust_changed and self.on_trust_change is not None:
            self._trust_changed = False
            self.on_trust_change()
