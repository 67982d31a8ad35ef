"""Keys from files (PNEUMOSCAN_API_KEYS_FILE, PNEUMOSCAN_READER_KEYS_FILE): plain or as SHA-256
digests, read again when they change (and on SIGHUP), a file that cannot be used keeping the
previous keys in force, and never a key in a message."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.cli import settings_problem
from app.main import create_app
from app.security import KeyFileError, KeyRing, build_keyring, key_id, read_key_file
from benchmarks.common import BENCH_KEY, running_server
from tests.conftest import fixture_bytes, make_settings

JPEG = fixture_bytes("chest_xray/NORMAL/NORMAL2-IM-0744-0001.jpeg")
FIRST, SECOND, RIS = (
    "pacs-gateway-key-0001-aaaa",
    "pacs-gateway-key-0002-bbbb",
    "ris-key-00000-cccc",
)


def sha256(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def write(path: Path, *lines: str) -> None:
    """As secret managers do: write aside, then rename over the file."""
    path.with_suffix(".new").write_text("\n".join(lines) + "\n")
    os.replace(path.with_suffix(".new"), path)


def test_a_key_file_holds_keys_or_their_digests(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    # as a Windows editor saves it: a byte-order mark and CRLF line ends
    path.write_bytes(
        f"\ufeff{FIRST}\r\n# the PACS gateway\r\n\r\n  {sha256(SECOND).upper()}  \r\n".encode()
    )
    assert read_key_file(path, "X") == ([FIRST], [sha256(SECOND)[7:]])
    ring = KeyRing((FIRST,), hashes=(sha256(SECOND)[7:],))
    # a key's id is the same whether the file holds the key or its digest
    assert ring.identify(SECOND) == key_id(SECOND) and ring.identify(FIRST) == key_id(FIRST)
    assert ring.identify("not-a-key-of-ours-xxxx") is None and ring.identify(None) is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("short-key\n", "line 1: not a key of 16 or more characters"),
        (f"{FIRST}\nsha256:abc\n", "line 2"),
        (f"{FIRST} with a space\n", "line 1"),
        (b"\xff\xfe", "cannot be read"),
    ],
)
def test_a_line_that_is_not_a_key_is_named_by_its_number_never_quoted(
    tmp_path: Path, content: str | bytes, expected: str
) -> None:
    path = tmp_path / "keys"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(KeyFileError, match=expected) as raised:
        read_key_file(path, "PNEUMOSCAN_API_KEYS_FILE")
    assert "short-key" not in str(raised.value) and FIRST not in str(raised.value)
    assert "PNEUMOSCAN_API_KEYS_FILE" in str(raised.value)


def test_serve_says_in_one_line_what_is_wrong_with_a_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PNEUMOSCAN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PNEUMOSCAN_API_KEYS", "")
    keys = tmp_path / "keys"
    monkeypatch.setenv("PNEUMOSCAN_API_KEYS_FILE", str(keys))
    assert "cannot be read" in settings_problem()  # missing
    keys.write_text("# nothing yet\n")
    assert "PNEUMOSCAN_API_KEYS is empty" in settings_problem()
    keys.write_text(f"{FIRST}\n")
    assert settings_problem() is None
    monkeypatch.setenv("PNEUMOSCAN_READER_KEYS", FIRST)  # the gateway's key as the RIS's
    assert "both an API key and a reader key" in settings_problem()


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_keys_are_added_and_revoked_without_a_restart(tiny_store: Path, tmp_path: Path) -> None:
    api_file, reader_file = tmp_path / "api-keys", tmp_path / "reader-keys"
    write(api_file, sha256(FIRST))
    write(reader_file, RIS)
    settings = make_settings(
        tiny_store,
        tmp_path / "data",
        api_keys="",
        api_keys_file=api_file,
        reader_keys_file=reader_file,
        keys_reload_seconds=3600,  # checked by hand below, as a file change or SIGHUP would
    )
    kept = Kept()  # the app replaces the "pneumoscan" handlers (caplog's too), not a child's
    logging.getLogger("pneumoscan.keys").addHandler(kept)
    with TestClient(create_app(settings)) as client:
        watcher = client.app.state.services.key_watcher

        def predict(key: str) -> int:
            headers = {"X-API-Key": key, "Content-Type": "image/jpeg"}
            return client.post("/predict", content=JPEG, headers=headers).status_code

        assert (predict(FIRST), predict(SECOND), predict(RIS)) == (200, 401, 403)
        assert watcher.check() is False  # nothing changed

        write(api_file, "# FIRST revoked", SECOND)
        assert watcher.check() is True
        assert (predict(FIRST), predict(SECOND), predict(RIS)) == (401, 200, 403)

        write(api_file, SECOND, "oops-half-a-key")  # a bad edit: nothing changes
        assert watcher.check() is False and watcher.check() is False
        assert (predict(FIRST), predict(SECOND)) == (401, 200)
        assert "pneumoscan_key_files_failing 1.0" in client.get("/metrics").text
        errors = [r.getMessage() for r in kept.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "line 2" in errors[0]  # said once

        write(api_file, SECOND, FIRST)  # fixed
        assert watcher.check() is True
        assert (predict(FIRST), predict(SECOND)) == (200, 200)
        assert "pneumoscan_key_files_failing 0.0" in client.get("/metrics").text
    logging.getLogger("pneumoscan.keys").removeHandler(kept)
    logged = "\n".join(r.getMessage() + str(r.__dict__) for r in kept.records)
    assert "key files reloaded: 1 API keys, 1 reader keys" in logged
    for key in (FIRST, SECOND, RIS, "oops-half-a-key"):
        assert key not in logged


def test_sighup_reads_the_key_files_again(tiny_store: Path, tmp_path: Path) -> None:
    """Against a real uvicorn without TLS: SIGHUP used to stop such a service."""
    keys = tmp_path / "keys"
    write(keys, FIRST)
    env = {"PNEUMOSCAN_API_KEYS_FILE": str(keys), "PNEUMOSCAN_KEYS_RELOAD_SECONDS": "3600"}
    with running_server(tiny_store, tmp_path / "data", extra_env=env) as server:
        url = server["url"]

        def predict(key: str) -> int:
            headers = {"X-API-Key": key, "Content-Type": "image/jpeg"}
            return httpx.post(f"{url}/predict", content=JPEG, headers=headers).status_code

        assert (predict(BENCH_KEY), predict(FIRST), predict(SECOND)) == (200, 200, 401)
        write(keys, SECOND)
        os.kill(server["pid"], signal.SIGHUP)
        deadline = time.monotonic() + 10
        while predict(SECOND) != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (predict(BENCH_KEY), predict(FIRST), predict(SECOND)) == (200, 401, 200)
        assert server["process"].poll() is None


def test_keys_from_settings_and_files_are_combined(tmp_path: Path, tiny_store: Path) -> None:
    api_file = tmp_path / "keys"
    write(api_file, FIRST, FIRST)
    ring = build_keyring(
        make_settings(tiny_store, tmp_path, api_keys_file=api_file, reader_keys=RIS)
    )
    assert ring.counts == (3, 1)  # the two conftest keys and FIRST once; the RIS
    assert ring.is_reader(key_id(RIS)) and not ring.is_reader(key_id(FIRST))


def printed(out: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in out.splitlines())
    return {name: value.strip() for name, value in pairs}


def test_new_key_prints_a_key_and_the_line_that_accepts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from app.cli import main

    assert main(["new-key"]) == 0
    first = printed(capsys.readouterr().out)
    assert main(["new-key"]) == 0
    second = printed(capsys.readouterr().out)
    assert first["key"] != second["key"] and len(first["key"]) >= 40
    keys = tmp_path / "keys"
    keys.write_text(first["line"] + "\n")
    ring = KeyRing(keys=(), hashes=tuple(read_key_file(keys, "X")[1]))
    assert ring.identify(first["key"]) == key_id(first["key"])
    assert ring.identify(second["key"]) is None
