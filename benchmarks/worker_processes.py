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
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, default_store, report, rss_mb, running_server
from benchmarks.service import many_clients_wrk

RADIOGRAPH = ROOT / "tests" / "fixtures" / "chest_xray" / "NORMAL" / "NORMAL2-IM-0744-0001.jpeg"


def tree_rss_mb(process: subprocess.Popen) -> float:
    """The server process and its children (uvicorn's workers)."""
    children = subprocess.run(
        ["pgrep", "-P", str(process.pid)], capture_output=True, text=True
    ).stdout.split()
    return sum(rss_mb(int(pid)) for pid in [process.pid, *children])


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
            env = {"PNEUMOSCAN_MODEL_INSTANCES": str(instances)}
            with (
                tempfile.TemporaryDirectory() as folder,
                running_server(default_store(), Path(folder), None, env, workers) as server,
            ):
                time.sleep(3.0 if workers > 1 else 0.5)  # the second worker may still load
                many_clients_wrk(server["url"], image, 32, 2)  # warm-up
                loaded = many_clients_wrk(server["url"], image, 32, args.seconds)
                runs.append({**loaded, "rss_mb": round(tree_rss_mb(server["process"]))})
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
