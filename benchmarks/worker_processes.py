"""Would more server processes close the 32-client gap? One process with two model instances
(the shipped setting) against two uvicorn worker processes with one instance each, in
alternating rounds, driven by wrk on loopback.

python -m benchmarks.worker_processes [--rounds 2] [--seconds 8]

Two processes each hold their own event loop and GIL, so the Python work per request spreads
over both cores; they also hold two TensorFlow runtimes (memory) and batch separately. This is
a measurement, not a supported setting: `pneumoscan serve` runs one worker (its metrics,
explanation sharing and upload budget are per process).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import BENCH_KEY, ROOT, default_store, free_port, report, rss_mb
from benchmarks.service import many_clients_wrk

RADIOGRAPH = ROOT / "tests" / "fixtures" / "chest_xray" / "NORMAL" / "NORMAL2-IM-0744-0001.jpeg"


def start(workers: int, instances: int, data_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "PNEUMOSCAN_MODEL_STORE": str(default_store()),
        "PNEUMOSCAN_DATA_DIR": str(data_dir),
        "PNEUMOSCAN_API_KEYS": BENCH_KEY,
        "PNEUMOSCAN_MODEL_INSTANCES": str(instances),
        "PNEUMOSCAN_LOG_LEVEL": "WARNING",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "app.main:create_app",
        "--factory",
        "--workers",
        str(workers),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--timeout-keep-alive",
        "75",
    ]
    log = (data_dir / "server.log").open("w")
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    else:
        raise RuntimeError(f"server did not become ready: {(data_dir / 'server.log').read_text()}")
    time.sleep(3.0 if workers > 1 else 0.5)  # the second worker may still be loading
    return process, url


def group_rss_mb(process: subprocess.Popen) -> float:
    found = subprocess.run(
        ["pgrep", "-g", str(os.getpgid(process.pid))], capture_output=True, text=True
    ).stdout.split()
    return sum(rss_mb(int(pid)) for pid in found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed (Debian package wrk)")
    image = RADIOGRAPH.read_bytes()
    results: dict[str, list[dict]] = {"1 process x 2 instances": [], "2 processes x 1": []}
    for _ in range(args.rounds):
        for runs, (workers, instances) in zip(results.values(), ((1, 2), (2, 1)), strict=True):
            with tempfile.TemporaryDirectory() as folder:
                process, url = start(workers, instances, Path(folder))
                try:
                    many_clients_wrk(url, image, 32, 2)  # warm-up
                    loaded = many_clients_wrk(url, image, 32, args.seconds)
                    runs.append({**loaded, "rss_mb": round(group_rss_mb(process))})
                finally:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(30)
    rows = [
        (
            label,
            "; ".join(
                f"{r['images_per_s']:.0f} images/s, {r['errors']} errors, p95 {r['p95']:.0f} ms, "
                f"RSS {r['rss_mb']} MB"
                for r in runs
            ),
        )
        for label, runs in results.items()
    ]
    report("32 clients: one process or two (alternating rounds)", rows, {"runs": results})


if __name__ == "__main__":
    main()
