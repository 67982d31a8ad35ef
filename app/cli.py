"""`pneumoscan serve | train | evaluate | readings | check | new-key`: the one entry point."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "evaluate", "card"):
        from training.__main__ import main as training_main

        return training_main(argv)
    if argv and argv[0] == "readings":
        from app.readings import main as readings_main

        return readings_main(argv[1:])
    if argv and argv[0] == "check":
        from app.conformance import main as check_main

        return check_main(argv[1:])
    if argv and argv[0] == "new-key":
        return new_key(argv[1:])
    if argv and argv[0] == "backup":
        from app.backup import main as backup_main

        return backup_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="pneumoscan",
        description="pneumoscan service and training. Subcommands: serve, train, evaluate, "
        "readings, check, new-key, backup.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the API (settings from PNEUMOSCAN_* variables)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    sub.add_parser("train", help="train a new model version (see `pneumoscan train -h`)")
    sub.add_parser(
        "readings", help="the model against the radiologists' reads (`pneumoscan readings -h`)"
    )
    sub.add_parser("evaluate", help="score a model version (see `pneumoscan evaluate -h`)")
    sub.add_parser(
        "check", help="what the service would answer for a site's files (`pneumoscan check -h`)"
    )
    sub.add_parser("new-key", help="a new random key and its line for a key file")
    sub.add_parser("backup", help="a consistent copy of the audit database, without images")
    args = parser.parse_args(argv)
    problem = settings_problem()
    if problem:
        print(f"pneumoscan: {problem}", file=sys.stderr)
        return 2

    import uvicorn

    from app.http_protocol import BoundedHeadHttpToolsProtocol
    from app.observability import uvicorn_log_config
    from app.server import DrainingServer
    from app.settings import Settings
    from app.tls import uvicorn_tls_options

    # One worker: the model, micro-batcher and SQLite writer live in one process; TensorFlow
    # uses the cores inside it.
    logging.captureWarnings(True)  # a library's warnings become JSON records, not bare text
    settings = Settings()
    BoundedHeadHttpToolsProtocol.head_timeout_s = settings.head_timeout_s
    config = uvicorn.Config(
        "app.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=1,
        log_level="warning",
        log_config=uvicorn_log_config("warning"),
        access_log=False,
        server_header=False,  # no product banner for scanners
        timeout_graceful_shutdown=10,
        # Longer than the idle expiry of common client pools (httpx 5 s, urllib3 none, nginx
        # upstream 60 s): with uvicorn's 5 s default a pooled connection could be closed by the
        # server just as the client reused it, and a POST on it fails (seen once in 4000
        # requests under the 64-client overload run).
        timeout_keep_alive=75,
        # httptools, with a bound on the request head (app/http_protocol.py)
        http=BoundedHeadHttpToolsProtocol,
        **uvicorn_tls_options(settings),
    )
    server = DrainingServer(config, settings.drain_seconds, settings)
    server.run()
    return 0 if server.started else 3  # uvicorn's exit code for a failed start


def new_key(argv: list[str]) -> int:
    """A new random API key (256 bits) for a client, and the `sha256:` line that lets
    PNEUMOSCAN_API_KEYS_FILE or PNEUMOSCAN_READER_KEYS_FILE accept it without holding it."""
    import hashlib
    import secrets

    argparse.ArgumentParser(
        prog="pneumoscan new-key",
        description="Print a new random key (give it to the client: PACS gateway, RIS) and "
        "the line for a key file (sha256:<hex>, which accepts the key without holding it).",
    ).parse_args(argv)
    key = secrets.token_urlsafe(32)
    print(f"key:  {key}")
    print(f"line: sha256:{hashlib.sha256(key.encode()).hexdigest()}")
    return 0


def settings_problem() -> str | None:
    """What keeps the service from starting, said in one line before anything starts (a
    traceback from the server's start-up would bury it; the app checks the keys again for
    other launchers), or None."""
    from pydantic import ValidationError

    from app.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = "_".join(str(part) for part in error["loc"]).upper()
            problems.append(f"PNEUMOSCAN_{field}: {error['msg']}" if field else error["msg"])
        return "invalid settings: " + "; ".join(problems)
    from app.security import KeyFileError, build_keyring

    try:
        keyring = build_keyring(settings)
    except KeyFileError as exc:
        return str(exc)
    if not keyring.keys and not keyring.hashes and not settings.allow_no_auth:
        return (
            "PNEUMOSCAN_API_KEYS is empty: set one or more keys (comma-separated, or one per "
            "line in PNEUMOSCAN_API_KEYS_FILE), or PNEUMOSCAN_ALLOW_NO_AUTH=true for local "
            "development only."
        )
    data_dir = settings.data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / ".pneumoscan-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return (
            f"PNEUMOSCAN_DATA_DIR {data_dir} is not a writable folder ({exc.strerror}): the "
            "audit database and stored images live there; set it to one this user can write."
        )
    from app.tls import tls_problem

    return tls_problem(settings)


if __name__ == "__main__":
    sys.exit(main())
