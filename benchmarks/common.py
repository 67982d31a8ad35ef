"""Helpers for the benchmark and reliability scripts: a real uvicorn on loopback, multipart
bodies, percentiles, and the one-table-plus-JSON-line report format."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from app.settings import usable_cpus

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
FIXTURES = ROOT / "tests" / "fixtures"
BENCH_KEY = "benchmark-key-0123456789abcdef"
BOUNDARY = "pneumoscanbenchmarkboundary"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def multipart(data: bytes, name: str = "image.jpeg") -> tuple[bytes, dict[str, str]]:
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    return body, {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "X-API-Key": BENCH_KEY,
    }


def wrk_script(folder: Path, template: str, data: bytes) -> Path:
    """Write `data` as a multipart body into `folder` and render the wrk Lua `template` (fields
    `body`, `content_type`, `key`) that posts it; returns the script's path."""
    body, headers = multipart(data)
    body_path = folder / "body.bin"
    body_path.write_bytes(body)
    script = folder / "post.lua"
    script.write_text(
        template.format(
            body=body_path, content_type=headers["Content-Type"], key=headers["X-API-Key"]
        )
    )
    return script


def percentiles(values: list[float], points=(50, 95, 99)) -> dict[str, float]:
    if not values:
        return {f"p{p}": float("nan") for p in points}
    return {f"p{p}": round(float(np.percentile(values, p)), 2) for p in points}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


@contextmanager
def running_server(
    store: Path,
    data_dir: Path,
    port: int | None = None,
    extra_env: dict[str, str] | None = None,
    workers: int = 1,
    wait_for: str = "/readyz",
    tls_client: ssl.SSLContext | None = None,
) -> Iterator[dict]:
    """Start `pneumoscan serve` on 127.0.0.1, wait for `wait_for` (/readyz: serving; /healthz:
    the process answers, ready or not), stop it on exit. Served over HTTPS when `extra_env`
    sets PNEUMOSCAN_TLS_CERTFILE; `tls_client` is then how the readiness poll connects. With
    `workers` > 1 it runs uvicorn's own multi-process mode instead (a measurement only:
    `pneumoscan serve` has one worker), in a process group of its own, stopped as a group."""
    import httpx

    port = port or free_port()
    env = {
        **os.environ,
        "PNEUMOSCAN_MODEL_STORE": str(store),
        "PNEUMOSCAN_DATA_DIR": str(data_dir),
        "PNEUMOSCAN_API_KEYS": BENCH_KEY,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PNEUMOSCAN_LOG_LEVEL": "WARNING",
        # stopped at once (no drain before the listener closes) unless a caller asks for one
        "PNEUMOSCAN_DRAIN_SECONDS": "0",
        **(extra_env or {}),
    }
    started = time.perf_counter()
    # Logs go to a file, never an unread pipe (a full pipe would stall the server).
    log_file = tempfile.NamedTemporaryFile(prefix="pneumoscan-", suffix=".log", delete=False)
    if workers == 1:
        command = [sys.executable, "-m", "app.cli", "serve"]
    else:
        command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory"]
        command += ["--workers", str(workers), "--log-level", "warning"]
        command += ["--timeout-keep-alive", "75"]  # as `pneumoscan serve` sets it
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=workers > 1,
    )
    scheme = "https" if env.get("PNEUMOSCAN_TLS_CERTFILE") else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    ready_s = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {Path(log_file.name).read_text()[-2000:]}")
            try:
                answer = httpx.get(f"{url}{wait_for}", timeout=1, verify=tls_client or True)
                if answer.status_code == 200:
                    ready_s = time.perf_counter() - started
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        if ready_s is None:
            raise RuntimeError("server did not become ready in 120 s")
        yield {
            "url": url,
            "pid": process.pid,
            "process": process,
            "ready_s": ready_s,
            "log": Path(log_file.name),
        }
    finally:
        if workers > 1:
            os.killpg(process.pid, signal.SIGTERM)  # the workers too
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log_file.close()
        Path(log_file.name).unlink(missing_ok=True)


def default_store() -> Path:
    return Path(os.environ.get("PNEUMOSCAN_MODEL_STORE", ROOT / "model_store"))


def machine() -> dict[str, object]:
    """What the numbers were measured on: ratios travel between machines, absolute figures
    do not (this project's VM type changed between rounds and the model ran twice as fast)."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    tensorflow = sys.modules.get("tensorflow")
    return {
        "cpu": cpu,
        "usable_cpus": usable_cpus(),  # affinity mask and cgroup quota, as the service sees
        "python": sys.version.split()[0],
        "tensorflow": getattr(tensorflow, "__version__", None),
    }


def report(title: str, rows: list[tuple[str, object]], payload: dict) -> None:
    """Print a table, then the same numbers as one JSON line; both name the machine."""
    host = machine()
    rows = [*rows, ("machine", f"{host['cpu']}, {host['usable_cpus']} usable CPUs")]
    payload = {**payload, "machine": host}
    width = max(len(name) for name, _ in rows) if rows else 10
    print(f"\n{title}\n" + "-" * (width + 24))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps({"benchmark": title, **payload}))
