"""HTTPS and mutual TLS for `pneumoscan serve`, its container health probe, and the Orthanc
plugin as an HTTPS client, against a real uvicorn on 127.0.0.1 with certificates from a test
CA (trustme)."""

from __future__ import annotations

import importlib.util
import os
import re
import ssl
import sys
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import trustme

from app.cli import settings_problem
from benchmarks.common import BENCH_KEY, running_server
from tests.conftest import fixture_bytes
from tests.utils.fresh_process import REPO, run_code

JPEG = fixture_bytes("chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg")
DICOM = fixture_bytes("dicom/person1946_bacteria_4874.dcm")
HEADERS = {"X-API-Key": BENCH_KEY, "Content-Type": "image/jpeg"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """The hospital's CA, the service's certificate, a client's (the PACS gateway) and one
    from a CA the service does not trust."""
    folder = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    files = types.SimpleNamespace(folder=folder, authority=ca)
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    server.private_key_pem.write_to_path(str(folder / "server.key"))
    ca.issue_cert("pacs-gateway.hospital.example").private_key_and_cert_chain_pem.write_to_path(
        str(folder / "client.pem")
    )
    stranger.issue_cert("intruder.example").private_key_and_cert_chain_pem.write_to_path(
        str(folder / "stranger.pem")
    )
    for name in ("ca", "server", "client", "stranger"):
        setattr(files, name, folder / f"{name}.pem")
    files.server_key = folder / "server.key"
    return files


def client_context(pki: types.SimpleNamespace, certificate: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if certificate is not None:
        context.load_cert_chain(str(certificate))
    return context


def tls_env(pki: types.SimpleNamespace, mutual: bool) -> dict[str, str]:
    env = {
        "PNEUMOSCAN_TLS_CERTFILE": str(pki.server),
        "PNEUMOSCAN_TLS_KEYFILE": str(pki.server_key),
    }
    if mutual:
        env["PNEUMOSCAN_TLS_CLIENT_CA"] = str(pki.ca)
    return env


@pytest.fixture(scope="module")
def mutual_server(
    tiny_store: Path, tmp_path_factory: pytest.TempPathFactory, pki
) -> Iterator[dict]:
    with running_server(
        tiny_store,
        tmp_path_factory.mktemp("mtls"),
        extra_env=tls_env(pki, mutual=True),
        tls_client=client_context(pki, pki.client),
    ) as running:
        yield running


def test_https_serves_and_refuses_plain_http(tiny_store: Path, tmp_path: Path, pki) -> None:
    with running_server(
        tiny_store, tmp_path, extra_env=tls_env(pki, mutual=False), tls_client=client_context(pki)
    ) as server:
        url = server["url"]
        assert url.startswith("https://")
        with httpx.Client(verify=client_context(pki)) as client:
            answer = client.post(f"{url}/predict", content=JPEG, headers=HEADERS)
            assert answer.status_code == 200, answer.text
            assert answer.json()["label"] in ("NORMAL", "PNEUMONIA")
            assert answer.headers["strict-transport-security"] == "max-age=31536000"
        # The key still travels only inside TLS: plain HTTP on the same port gets no answer.
        with pytest.raises(httpx.HTTPError):
            httpx.post(url.replace("https", "http"), content=JPEG, headers=HEADERS, timeout=5)
        # A client that does not trust the hospital's CA refuses the server.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=5)


def test_mutual_tls_requires_a_client_certificate_from_the_configured_ca(
    mutual_server: dict, pki
) -> None:
    url = mutual_server["url"]
    for refused in (client_context(pki), client_context(pki, pki.stranger)):
        with pytest.raises(httpx.HTTPError):
            with httpx.Client(verify=refused, timeout=5) as client:
                client.get(f"{url}/healthz").raise_for_status()
    with httpx.Client(verify=client_context(pki, pki.client)) as client:
        answer = client.post(f"{url}/predict", content=JPEG, headers=HEADERS)
        assert answer.status_code == 200, answer.text
        # A certificate is not a key: the API key is still required.
        no_key = client.post(f"{url}/predict", content=JPEG, headers={"Content-Type": "image/jpeg"})
        assert no_key.status_code == 401


def not_after(pem: bytes) -> float:
    """A certificate's expiry as `cryptography` reads it: the reference the service's own
    standard-library reading is checked against."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()


def expiry_metrics(url: str, context: ssl.SSLContext) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", verify=context, timeout=10).text
    found = {}
    for line in text.splitlines():
        match = re.match(
            r'pneumoscan_tls_certificate_expiry_timestamp_seconds\{certificate="(\w+)"\} (\S+)',
            line,
        )
        if match:
            found[match[1]] = float(match[2])
    return found


def test_metrics_say_when_the_server_and_client_ca_certificates_expire(
    mutual_server: dict, pki
) -> None:
    assert expiry_metrics(mutual_server["url"], client_context(pki, pki.client)) == {
        "server": not_after(pki.server.read_bytes()),
        "client_ca": not_after(pki.ca.read_bytes()),
    }


def test_an_expiring_or_expired_certificate_is_logged_and_the_earliest_ca_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from app import tls

    now = datetime.now(UTC).replace(microsecond=0)
    ca, other_ca = trustme.CA(), trustme.CA()
    soon = ca.issue_cert("127.0.0.1", not_after=now + timedelta(days=5))
    soon.cert_chain_pems[0].write_to_path(str(tmp_path / "soon.pem"))
    assert tls.certificate_expiry(tmp_path / "soon.pem") == (now + timedelta(days=5)).timestamp()
    assert tls.certificate_expiry(tmp_path / "missing.pem") is None
    # the client CA file holds two CAs: the first to expire is the one that matters
    bundle = tmp_path / "cas.pem"
    bundle.write_bytes(ca.cert_pem.bytes() + other_ca.cert_pem.bytes())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_verify_locations(cafile=bundle)
    assert tls.earliest_ca_expiry(context) == min(
        not_after(ca.cert_pem.bytes()), not_after(other_ca.cert_pem.bytes())
    )
    try:
        with caplog.at_level("WARNING", logger="pneumoscan.tls"):
            tls.record_expiry(now.timestamp() + 5 * 86400, now.timestamp() - 60)
        assert tls.expiry == {
            "server": now.timestamp() + 5 * 86400,
            "client_ca": now.timestamp() - 60,
        }
        levels = {record.levelname: record.getMessage() for record in caplog.records}
        assert "PNEUMOSCAN_TLS_CERTFILE expires on" in levels["WARNING"]
        assert "PNEUMOSCAN_TLS_CLIENT_CA expired on" in levels["ERROR"]
        caplog.clear()
        tls.record_expiry(now.timestamp() + 90 * 86400, None)  # renewed: quiet
        assert not caplog.records and tls.expiry == {"server": now.timestamp() + 90 * 86400}
    finally:
        tls.expiry.clear()


def test_the_container_health_probe_speaks_tls(mutual_server: dict, pki) -> None:
    """The HEALTHCHECK of the image, `python -m app.healthcheck <port>`, under mutual TLS."""
    port = mutual_server["url"].rsplit(":", 1)[1]
    code = f"import sys; from app.healthcheck import main; sys.exit(main([{port!r}]))"
    env_before = dict(os.environ)
    try:
        os.environ.update(tls_env(pki, mutual=True))
        assert run_code(code).returncode == 0
        os.environ.pop("PNEUMOSCAN_TLS_CLIENT_CA")  # no client certificate: refused
        assert run_code(code).returncode == 1
        for name in ("PNEUMOSCAN_TLS_CERTFILE", "PNEUMOSCAN_TLS_KEYFILE"):
            os.environ.pop(name)  # plain HTTP against a TLS port
        assert run_code(code).returncode == 1
    finally:
        os.environ.clear()
        os.environ.update(env_before)


def test_the_orthanc_plugin_posts_over_mutual_tls(
    mutual_server: dict, pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(
        sys.modules,
        "orthanc",
        types.SimpleNamespace(RegisterOnChangeCallback=lambda callback: None),
    )
    spec = importlib.util.spec_from_file_location(
        "pneumoscan_plugin_tls", REPO / "integrations" / "orthanc" / "pneumoscan_plugin.py"
    )
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    assert plugin.tls_context("http://api:8000", {}) is None
    url = mutual_server["url"]
    monkeypatch.setattr(plugin, "SERVICE", url)
    monkeypatch.setattr(plugin, "API_KEY", BENCH_KEY)
    environ = {"PNEUMOSCAN_CA_FILE": str(pki.ca), "PNEUMOSCAN_CLIENT_CERT": str(pki.client)}
    monkeypatch.setattr(plugin, "TLS_CONTEXT", plugin.tls_context(url, environ))
    key = plugin.idempotency_key("instance-1", DICOM)
    sr, label, checks, prediction_id = plugin._post_predict(DICOM, key)
    assert sr[128:132] == b"DICM" and label in ("NORMAL", "PNEUMONIA")
    assert checks == {"PneumoscanAgeCheck": "unknown"}  # the fixture states no age
    assert plugin._get_overlay(prediction_id)[:4] == b"\x89PNG"  # the overlay, same channel
    # a try whose answer was lost: the same key gets the same SR, not a second prediction
    assert plugin._post_predict(DICOM, key) == (sr, label, checks, prediction_id)
    # Without the client certificate the service refuses the connection, which the plugin
    # treats as the service being unreachable: it retries, the image is not lost.
    monkeypatch.setattr(
        plugin, "TLS_CONTEXT", plugin.tls_context(url, {"PNEUMOSCAN_CA_FILE": str(pki.ca)})
    )
    with pytest.raises(plugin.Transient):
        plugin._post_predict(DICOM, key)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"PNEUMOSCAN_TLS_CERTFILE": "server.pem"}, "tls_certfile and tls_keyfile"),
        ({"PNEUMOSCAN_TLS_CLIENT_CA": "ca.pem"}, "needs tls_certfile"),
        (
            {"PNEUMOSCAN_TLS_CERTFILE": "ca.pem", "PNEUMOSCAN_TLS_KEYFILE": "server.key"},
            "PNEUMOSCAN_TLS_CERTFILE / PNEUMOSCAN_TLS_KEYFILE cannot be used",
        ),
        (
            {
                "PNEUMOSCAN_TLS_CERTFILE": "server.pem",
                "PNEUMOSCAN_TLS_KEYFILE": "server.key",
                "PNEUMOSCAN_TLS_CLIENT_CA": "missing.pem",
            },
            "PNEUMOSCAN_TLS_CLIENT_CA cannot be used",
        ),
        ({"PNEUMOSCAN_TLS_CERTFILE": "", "PNEUMOSCAN_TLS_KEYFILE": ""}, None),
    ],
)
def test_tls_settings_problems_are_one_line_before_start(
    pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict, expected: str | None
) -> None:
    """A certificate that is not the key's, a missing file, half a pair: said in one line by
    `pneumoscan serve` before uvicorn starts (which would bury it in a traceback)."""
    monkeypatch.setenv("PNEUMOSCAN_API_KEYS", BENCH_KEY)
    monkeypatch.setenv("PNEUMOSCAN_DATA_DIR", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, str(pki.folder / value) if value else "")
    problem = settings_problem()
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem and "\n" not in problem


def presented_certificate(url: str, context: ssl.SSLContext) -> bytes:
    """The DER certificate a new connection to `url` is shown."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    with (
        socket.create_connection((parsed.hostname, parsed.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=parsed.hostname) as tls,
    ):
        return tls.getpeercert(binary_form=True)


def wait_for_certificate(url: str, context: ssl.SSLContext, expected: bytes) -> bool:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if presented_certificate(url, context) == expected:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("trigger", ["file check", "SIGHUP"])
def test_a_renewed_certificate_is_served_without_a_restart(
    tiny_store: Path, tmp_path: Path, trigger: str
) -> None:
    """An ACME client or cert-manager replaces the files and sends no signal: the periodic check
    takes them up; an operator can also send SIGHUP. A half-renewed pair (the new certificate
    with the old key) is not loaded, and the old pair keeps serving until the key arrives."""
    import signal
    import time

    ca = trustme.CA()
    now = datetime.now(UTC).replace(microsecond=0)
    # the first certificate is due for renewal (logged at start), the renewed one is not
    first = ca.issue_cert("127.0.0.1", not_after=now + timedelta(days=10))
    renewed = ca.issue_cert("127.0.0.1", not_after=now + timedelta(days=400))
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"

    def replace(path: Path, blob) -> None:  # as renewal tools do: write aside, then rename
        blob.write_to_path(str(path.with_suffix(".new")))
        os.replace(path.with_suffix(".new"), path)

    replace(cert, first.cert_chain_pems[0])
    replace(key, first.private_key_pem)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    der = {
        name: ssl.PEM_cert_to_DER_cert(issued.cert_chain_pems[0].bytes().decode())
        for name, issued in (("first", first), ("renewed", renewed))
    }
    env = {
        "PNEUMOSCAN_TLS_CERTFILE": str(cert),
        "PNEUMOSCAN_TLS_KEYFILE": str(key),
        "PNEUMOSCAN_TLS_RELOAD_SECONDS": "0.2" if trigger == "file check" else "3600",
    }
    with running_server(tiny_store, tmp_path / "data", extra_env=env, tls_client=context) as srv:
        url = srv["url"]
        assert presented_certificate(url, context) == der["first"]
        expires = (now + timedelta(days=10)).timestamp()
        assert expiry_metrics(url, context) == {"server": expires}
        with httpx.Client(verify=context, timeout=30) as kept:  # a connection opened before
            assert kept.post(f"{url}/predict", content=JPEG, headers=HEADERS).status_code == 200
            replace(cert, renewed.cert_chain_pems[0])  # the key comes later
            if trigger == "SIGHUP":
                os.kill(srv["pid"], signal.SIGHUP)
            time.sleep(1.0)
            assert presented_certificate(url, context) == der["first"]  # still the whole pair
            replace(key, renewed.private_key_pem)
            if trigger == "SIGHUP":
                os.kill(srv["pid"], signal.SIGHUP)
            assert wait_for_certificate(url, context, der["renewed"])
            renewed_expiry = {"server": (now + timedelta(days=400)).timestamp()}
            deadline = time.monotonic() + 10  # recorded just after the live context's load
            while expiry_metrics(url, context) != renewed_expiry and time.monotonic() < deadline:
                time.sleep(0.1)
            assert expiry_metrics(url, context) == renewed_expiry
            # the connection made before the renewal still answers
            assert kept.post(f"{url}/predict", content=JPEG, headers=HEADERS).status_code == 200
        assert srv["process"].poll() is None  # SIGHUP reloads, it no longer stops the service
        log = srv["log"].read_text()
    assert log.count("changed TLS files not loaded") == 1, log[-2000:]
    assert log.count("PNEUMOSCAN_TLS_CERTFILE expires on") == 1, log[-2000:]  # the first only


def test_a_non_ascii_server_name_is_refused_without_a_traceback(mutual_server: dict, pki) -> None:
    """Every handshake goes through the SNI callback (app/tls.py), and Python decodes the
    server name as ASCII before calling it: a ClientHello naming another (only a broken or
    hostile client sends one) is refused, logged once as one JSON record without the client's
    bytes, and the next handshakes are served as before."""
    import shutil
    import subprocess
    import time

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to send a raw server name")
    port = mutual_server["url"].rsplit(":", 1)[1]
    for _ in range(2):
        sent = subprocess.run(
            [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "h\u00e9llo"],
            input=b"",
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert sent.returncode != 0
    with httpx.Client(verify=client_context(pki, pki.client), timeout=10) as client:
        assert client.get(f"{mutual_server['url']}/healthz").status_code == 200
    time.sleep(0.5)
    log = mutual_server["log"].read_text()
    assert log.count("server name (SNI) is not ASCII") == 1, log[-2000:]
    assert "Traceback" not in log and "\\xc3" not in log and "h\u00e9llo" not in log, log[-2000:]


def server_auth_only(ca: trustme.CA, folder: Path) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 whose Extended Key Usage is serverAuth alone, as
    many CAs issue them (trustme's include clientAuth, which hid this case)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pneumoscan")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = folder / "server-only.pem", folder / "server-only.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_the_health_probe_presents_its_own_client_certificate_under_mutual_tls(
    tiny_store: Path, tmp_path: Path, pki
) -> None:
    """A server certificate without clientAuth is refused as a client certificate, so a probe
    presenting it reports the service unhealthy, and says why; PNEUMOSCAN_HEALTHCHECK_CERT and
    _KEY give the probe a client certificate of its own."""
    cert, key = server_auth_only(pki.authority, tmp_path)
    env = {
        "PNEUMOSCAN_TLS_CERTFILE": str(cert),
        "PNEUMOSCAN_TLS_KEYFILE": str(key),
        "PNEUMOSCAN_TLS_CLIENT_CA": str(pki.ca),
    }
    with running_server(
        tiny_store, tmp_path / "data", extra_env=env, tls_client=client_context(pki, pki.client)
    ) as server:
        port = server["url"].rsplit(":", 1)[1]
        code = f"import sys; from app.healthcheck import main; sys.exit(main([{port!r}]))"
        env_before = dict(os.environ)
        try:
            os.environ.update(env)
            refused = run_code(code)
            assert refused.returncode == 1
            assert "PNEUMOSCAN_HEALTHCHECK_CERT" in refused.stderr, refused.stderr
            assert refused.stderr.count("\n") == 1
            os.environ["PNEUMOSCAN_HEALTHCHECK_CERT"] = str(pki.client)  # key in the same file
            accepted = run_code(code)
            assert accepted.returncode == 0, accepted.stderr
        finally:
            os.environ.clear()
            os.environ.update(env_before)
