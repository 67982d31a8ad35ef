"""Mutual TLS: a client certificate revoked by a CRL, or whose CA is removed from the client CA
file, is refused from the next handshake without a restart; no TLS session outlives that.
Against a real uvicorn on 127.0.0.1, with test CAs (trustme) and CRLs made with
`cryptography`, which is also the reference for the service's own reading of a CRL's dates."""

from __future__ import annotations

import base64
import http.client
import os
import re
import socket
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from app import tls
from app.cli import settings_problem
from benchmarks.common import BENCH_KEY, running_server
from tests.conftest import fixture_bytes

JPEG = fixture_bytes("chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg")
HEADERS = {"X-API-Key": BENCH_KEY, "Content-Type": "image/jpeg"}
NOW = datetime.now(UTC).replace(microsecond=0)


def crl_pem(
    ca: trustme.CA,
    revoked: tuple[trustme.LeafCert, ...] = (),
    next_update: datetime | None = None,
) -> bytes:
    """A CRL of `ca` revoking `revoked`, issued a minute ago, next update as given (a week)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    issued = NOW - timedelta(minutes=1)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject)
        .last_update(issued)
        .next_update(next_update or NOW + timedelta(days=7))
    )
    for leaf in revoked:
        serial = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(issued)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def reference_next_update(pem: bytes) -> float:
    from cryptography import x509

    return x509.load_pem_x509_crl(pem).next_update_utc.timestamp()


def test_crl_next_update_is_read_as_cryptography_reads_it() -> None:
    """UTCTime (before 2050) and GeneralizedTime (from 2050), several CRLs in one file."""
    ca, other = trustme.CA(), trustme.CA()
    soon = crl_pem(ca, next_update=NOW + timedelta(hours=5))
    late = crl_pem(other, next_update=datetime(2061, 3, 4, 5, 6, 7, tzinfo=UTC))
    assert b"\r\n" not in soon
    assert tls.crl_next_updates(soon + late) == [
        reference_next_update(soon),
        reference_next_update(late),
    ]
    assert tls.crl_next_updates(late) == [datetime(2061, 3, 4, 5, 6, 7, tzinfo=UTC).timestamp()]
    # saved on Windows
    assert tls.crl_next_updates(soon.replace(b"\n", b"\r\n")) == [reference_next_update(soon)]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "no PEM CRL"),
        (b"not a pem file\n", "no PEM CRL"),
        # a certificate in the CRL file would be trusted as a client CA
        (trustme.CA().cert_pem.bytes(), "PEM block 1 is a CERTIFICATE, not an X509 CRL"),
        (
            b"-----BEGIN X509 CRL-----\nMAMCAQE=\n-----END X509 CRL-----\n",  # SEQUENCE{INTEGER 1}
            "PEM block 1 is not a readable CRL",
        ),
        (
            b"-----BEGIN X509 CRL-----\nMIIB\n-----END X509 CRL-----\n",  # truncated length
            "PEM block 1 is not a readable CRL",
        ),
    ],
)
def test_a_crl_file_holding_anything_else_is_refused(content: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        tls.crl_next_updates(content)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_in_a_crl_block_are_read_or_refused_with_a_reason(body: bytes) -> None:
    pem = b"-----BEGIN X509 CRL-----\n" + base64.encodebytes(body) + b"-----END X509 CRL-----\n"
    try:
        times = tls.crl_next_updates(pem)
    except ValueError as exc:
        assert str(exc).startswith("PEM block 1 is not a readable CRL")
    else:
        assert len(times) == 1


def test_crl_settings_problems_are_one_line_before_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    server.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "crl.pem").write_bytes(ca.cert_pem.bytes())  # a CA where the CRLs belong
    monkeypatch.setenv("PNEUMOSCAN_API_KEYS", BENCH_KEY)
    monkeypatch.setenv("PNEUMOSCAN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PNEUMOSCAN_TLS_CERTFILE", str(tmp_path / "server.pem"))
    monkeypatch.setenv("PNEUMOSCAN_TLS_KEYFILE", str(tmp_path / "server.key"))
    monkeypatch.setenv("PNEUMOSCAN_TLS_CLIENT_CRL", str(tmp_path / "crl.pem"))
    problem = settings_problem()
    assert problem is not None and "tls_client_crl needs tls_client_ca" in problem
    monkeypatch.setenv("PNEUMOSCAN_TLS_CLIENT_CA", str(tmp_path / "ca.pem"))
    problem = settings_problem()
    assert problem == (
        "PNEUMOSCAN_TLS_CLIENT_CRL cannot be used (PEM CRLs of the client CAs, and nothing "
        "else, readable by this user): PEM block 1 is a CERTIFICATE, not an X509 CRL"
    )
    (tmp_path / "crl.pem").write_bytes(crl_pem(ca))
    assert settings_problem() is None


def test_a_crl_past_or_near_its_next_update_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    try:
        with caplog.at_level("WARNING", logger="pneumoscan.tls"):
            tls.record_expiry(None, None, time.time() + 3 * 3600)
            tls.record_expiry(None, None, time.time() - 60)
            tls.record_expiry(None, None, time.time() + 5 * 86400)  # replaced in time: quiet
        messages = [(record.levelname, record.getMessage()) for record in caplog.records]
        assert len(messages) == 2
        assert messages[0][0] == "WARNING" and "in 3.0 h" in messages[0][1]
        assert (
            messages[1][0] == "ERROR"
            and "every client certificate of its CA is refused" in (messages[1][1])
        )
        assert tls.watch.crl_next_update == pytest.approx(time.time() + 5 * 86400, abs=5)
    finally:
        tls.record_expiry(None, None, None)


def replace(path: Path, content: bytes) -> None:
    """As deployment tools do: write aside, then rename over the file."""
    path.with_suffix(".new").write_bytes(content)
    os.replace(path.with_suffix(".new"), path)


def handshake(url: str, context: ssl.SSLContext, session: ssl.SSLSession | None = None):
    """One TLS connection and request; (the status, or "refused", the session, whether it was
    resumed). Under TLS 1.3 the server checks the client's certificate after the client's
    handshake is done, so a refusal can come as an alert on the first read, or a close."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        with (
            socket.create_connection((parsed.hostname, parsed.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=parsed.hostname, session=session) as conn,
        ):
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = conn.recv(64)
            if not answer:
                return "refused", None, False
            return answer.split(b" ")[1].decode(), conn.session, conn.session_reused
    except (ssl.SSLError, OSError):
        return "refused", None, False


def metric(url: str, context: ssl.SSLContext, name: str) -> str | None:
    text = httpx.get(f"{url}/metrics", verify=context, timeout=10).text
    found = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)
    return found[1] if found else None


@pytest.mark.parametrize("trigger", ["file check", "SIGHUP"])
def test_revocation_and_ca_removal_take_effect_without_a_restart(
    tiny_store: Path, tmp_path: Path, trigger: str
) -> None:
    import signal

    server_ca, hospital, partner = trustme.CA(), trustme.CA(), trustme.CA()
    server = server_ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    server.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    gateway, lost_gateway = hospital.issue_cert("gw-1"), hospital.issue_cert("gw-2")
    stolen = hospital.issue_cert("gw-3")  # revoked before the service starts
    partner_gateway = partner.issue_cert("partner-gw")
    clients = {}
    for name, leaf in (
        ("gateway", gateway),
        ("lost", lost_gateway),
        ("partner", partner_gateway),
        ("stolen", stolen),
    ):
        context = ssl.create_default_context()
        server_ca.configure_trust(context)
        leaf.configure_cert(context)
        clients[name] = context
    cas, crls = tmp_path / "client_cas.pem", tmp_path / "client_crls.pem"
    replace(cas, hospital.cert_pem.bytes() + partner.cert_pem.bytes())
    first_crls = crl_pem(hospital, (stolen,)) + crl_pem(partner, (), NOW + timedelta(days=3))
    replace(crls, first_crls)
    env = {
        "PNEUMOSCAN_TLS_CERTFILE": str(tmp_path / "server.pem"),
        "PNEUMOSCAN_TLS_KEYFILE": str(tmp_path / "server.key"),
        "PNEUMOSCAN_TLS_CLIENT_CA": str(cas),
        "PNEUMOSCAN_TLS_CLIENT_CRL": str(crls),
        "PNEUMOSCAN_TLS_RELOAD_SECONDS": "0.2" if trigger == "file check" else "3600",
    }

    def reload_and_wait(client: str, expected: str) -> None:
        if trigger == "SIGHUP":
            os.kill(srv["pid"], signal.SIGHUP)
        deadline = time.monotonic() + 10
        while handshake(url, clients[client])[0] != expected and time.monotonic() < deadline:
            time.sleep(0.1)
        assert handshake(url, clients[client])[0] == expected

    with running_server(
        tiny_store, tmp_path / "data", extra_env=env, tls_client=clients["gateway"]
    ) as srv:
        url = srv["url"]
        for name in ("gateway", "lost", "partner"):
            assert handshake(url, clients[name])[0] == "200", name
        assert handshake(url, clients["stolen"])[0] == "refused"  # from the first handshake
        ok = clients["gateway"]
        assert float(metric(url, ok, "pneumoscan_tls_crl_next_update_timestamp_seconds")) == (
            reference_next_update(crl_pem(partner, next_update=NOW + timedelta(days=3)))
        )
        assert metric(url, ok, "pneumoscan_tls_files_failing") == "0.0"
        # No resumption: a session from before a revocation cannot skip the certificate check.
        status, session, _ = handshake(url, clients["lost"])
        assert status == "200"
        assert handshake(url, clients["lost"], session)[2] is False

        # The lost gateway's certificate is revoked: refused from the next handshake.
        replace(crls, crl_pem(hospital, (lost_gateway,)) + crl_pem(partner))
        reload_and_wait("lost", "refused")
        assert handshake(url, clients["lost"], session)[0] == "refused"
        assert handshake(url, clients["gateway"])[0] == "200"
        assert handshake(url, clients["partner"])[0] == "200"

        # The partnership ends: its CA is removed from the client CA file (and its CRL).
        replace(cas, hospital.cert_pem.bytes())
        replace(crls, crl_pem(hospital, (lost_gateway,)))
        reload_and_wait("partner", "refused")
        assert handshake(url, clients["gateway"])[0] == "200"
        with httpx.Client(verify=ok, timeout=30) as kept:  # the API still answers
            assert kept.post(f"{url}/predict", content=JPEG, headers=HEADERS).status_code == 200

        # A bad edit (a CA pasted into the CRL file) is not loaded: the previous files serve,
        # the revocation stays in force, and the gauge says so until the file is fixed.
        replace(crls, crl_pem(hospital, (lost_gateway,)) + partner.cert_pem.bytes())
        if trigger == "SIGHUP":
            os.kill(srv["pid"], signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (
            metric(url, ok, "pneumoscan_tls_files_failing") != "1.0" and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert metric(url, ok, "pneumoscan_tls_files_failing") == "1.0"
        assert handshake(url, clients["partner"])[0] == "refused"
        assert handshake(url, clients["lost"])[0] == "refused"
        assert handshake(url, clients["gateway"])[0] == "200"
        replace(crls, crl_pem(hospital))  # the lost gateway was found: un-revoked
        reload_and_wait("lost", "200")
        assert metric(url, ok, "pneumoscan_tls_files_failing") == "0.0"
        log = srv["log"].read_text()
    assert log.count("changed TLS files not loaded") == 1, log[-2000:]
    assert "PNEUMOSCAN_TLS_CLIENT_CRL cannot be used" in log
    assert "BEGIN" not in log  # never the files' contents


def kept_alive(url: str, context: ssl.SSLContext) -> http.client.HTTPSConnection:
    """A keep-alive connection that has had one request answered, left open."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    conn = http.client.HTTPSConnection(parsed.hostname, parsed.port, context=context, timeout=5)
    conn.request("GET", "/healthz")
    answer = conn.getresponse()
    answer.read()
    assert answer.status == 200
    assert answer.getheader("connection") != "close"
    return conn


def closed_by_server(conn: http.client.HTTPSConnection, within: float) -> bool:
    """Whether the server closes the idle connection within `within` seconds."""
    conn.sock.settimeout(within)
    try:
        return conn.sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:  # reset, or TLS's EOF without close_notify
        return True


def wait_for_line(log: Path, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 10
    while log.read_text().count(text) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.read_text().count(text) >= count, log.read_text()[-2000:]


def test_a_trust_change_closes_open_connections_after_their_answer(
    tiny_store: Path, tmp_path: Path
) -> None:
    """A client's certificate is checked in its handshake only, so a gateway revoked while its
    keep-alive connection stays busy would go on sending over it for as long as it likes. A
    change to the client CA or CRL file closes the open connections after their current answer
    (a request in flight is answered, with Connection: close); each client then reconnects and
    its certificate is checked against the changed files. A renewed server certificate, or a
    CRL file rewritten with the same content, leaves them open."""
    import signal

    server_ca, hospital = trustme.CA(), trustme.CA()
    server = server_ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    replace(cert, server.cert_chain_pems[0].bytes())
    replace(key, server.private_key_pem.bytes())
    clients = {}
    leaves = {name: hospital.issue_cert(name) for name in ("gw-1", "gw-2")}
    for name, leaf in leaves.items():
        context = ssl.create_default_context()
        server_ca.configure_trust(context)
        leaf.configure_cert(context)
        clients[name] = context
    cas, crls = tmp_path / "client_cas.pem", tmp_path / "client_crls.pem"
    replace(cas, hospital.cert_pem.bytes())
    replace(crls, crl_pem(hospital))
    env = {
        "PNEUMOSCAN_TLS_CERTFILE": str(cert),
        "PNEUMOSCAN_TLS_KEYFILE": str(key),
        "PNEUMOSCAN_TLS_CLIENT_CA": str(cas),
        "PNEUMOSCAN_TLS_CLIENT_CRL": str(crls),
        "PNEUMOSCAN_TLS_RELOAD_SECONDS": "3600",  # SIGHUP only: the test says when
        "PNEUMOSCAN_LOG_LEVEL": "INFO",
    }
    with running_server(
        tiny_store, tmp_path / "data", extra_env=env, tls_client=clients["gw-1"]
    ) as srv:
        url, log = srv["url"], srv["log"]
        kept = {name: kept_alive(url, clients[name]) for name in clients}

        # The server certificate renewed (the same bytes, a new file), and the CRL fetched again
        # unchanged (as an hourly cron job does): connections stay open.
        replace(cert, server.cert_chain_pems[0].bytes())
        replace(crls, crls.read_bytes())
        os.kill(srv["pid"], signal.SIGHUP)
        wait_for_line(log, "TLS files reloaded")
        for name, conn in kept.items():
            assert not closed_by_server(conn, 1.5), name
            conn.request("GET", "/healthz")
            answer = conn.getresponse()
            assert answer.status == 200 and answer.getheader("connection") != "close"
            answer.read()

        # A request in flight when gw-2 is revoked: its head and half its body are in.
        body = JPEG
        head = (
            f"POST /predict HTTP/1.1\r\nHost: x\r\nX-API-Key: {BENCH_KEY}\r\n"
            f"Content-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        busy = kept["gw-2"].sock
        busy.sendall(head + body[: len(body) // 2])
        replace(crls, crl_pem(hospital, (leaves["gw-2"],)))
        os.kill(srv["pid"], signal.SIGHUP)
        wait_for_line(log, "client CA or CRL file changed")
        busy.sendall(body[len(body) // 2 :])
        answer = b""
        busy.settimeout(10)
        while chunk := busy.recv(65536):  # read to the server's close
            answer += chunk
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 200 OK", answer[:300]
        assert b"connection: close" in rest.lower().split(b"\r\n\r\n")[0]
        assert b'"probabilities"' in rest

        # gw-1's idle connection is closed too (after the grace for a request just sent), not
        # at its idle timeout (75 s); both reconnect, and only the revoked one is refused.
        assert closed_by_server(kept["gw-1"], 5)
        assert handshake(url, clients["gw-1"])[0] == "200"
        assert handshake(url, clients["gw-2"])[0] == "refused"
        found = re.search(r"client CA or CRL file changed: (\d+) open TLS", log.read_text())
        assert found and int(found[1]) >= 2
    for conn in kept.values():
        conn.close()
