"""Fill the file system under PNEUMOSCAN_DATA_DIR while images arrive: every answer is 200 with
its audit record or 503 `storage_unavailable`; /readyz takes the instance out of rotation
from the first failed write and brings it back once space is freed, before any prediction;
with the default free-space floor a tiny file system is never ready at all.

Needs a small file system of its own: as root it mounts a tmpfs (default 2 MB) and unmounts
it after; otherwise pass one you mounted (`--data-dir`). Loopback only, bounded in count.

    python -m benchmarks.full_disk [--size-mb 2] [--uploads 300] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import httpx

from benchmarks.common import FIXTURES, default_store, multipart, report, running_server

BALLAST = "ballast.bin"  # taken from the free space up front, deleted to "free the disk"


@contextmanager
def small_file_system(size_mb: int, given: Path | None) -> Iterator[Path]:
    if given is not None:
        yield given
        return
    if os.geteuid() != 0:
        raise SystemExit("not root: mount a small file system yourself and pass --data-dir")
    mount = Path(tempfile.mkdtemp(prefix="pneumoscan-full-disk-"))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount)], check=True
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        mount.rmdir()


def readiness(client: httpx.Client) -> str:
    answer = client.get("/readyz")
    if answer.status_code == 200:
        return "ready"
    return answer.json().get("reason", "not_ready").split(":")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=2)
    parser.add_argument("--uploads", type=int, default=300)
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()
    image = (FIXTURES / "originals" / "person495_bacteria_2094.jpeg").read_bytes()
    body, headers = multipart(image)
    with small_file_system(args.size_mb, args.data_dir) as mount:
        data_dir = mount / "data"
        data_dir.mkdir(exist_ok=True)
        ballast = mount / BALLAST
        ballast.write_bytes(bytes(512 * 1024))
        # The write path: no free-space floor, so the writes themselves find the full disk.
        env = {"PNEUMOSCAN_MIN_FREE_MB": "0"}
        codes: Counter[str] = Counter()
        ready_after_failure: Counter[str] = Counter()
        with running_server(default_store(), data_dir, extra_env=env) as server:
            with httpx.Client(base_url=server["url"], timeout=30) as client:
                ready_before = readiness(client)
                first_failure = None
                for index in range(args.uploads):
                    answer = client.post("/predict", content=body, headers=headers)
                    code = str(answer.status_code)
                    if answer.status_code == 503:
                        code += " " + answer.json()["error"]["code"]
                        first_failure = index if first_failure is None else first_failure
                    codes[code] += 1
                    if first_failure is not None:
                        ready_after_failure[readiness(client)] += 1
                alive = client.get("/healthz").status_code
                ballast.unlink()
                ready_after_freeing = readiness(client)
                after = client.post("/predict", content=body, headers=headers).status_code
            log = server["log"].read_text()
        tracebacks = log.count("Traceback")
        # The floor: the same tiny file system with the default (64 MB) never becomes ready.
        shutil.rmtree(data_dir)
        data_dir.mkdir()
        with running_server(default_store(), data_dir, wait_for="/healthz") as server:
            with httpx.Client(base_url=server["url"], timeout=30) as client:
                floor_readiness = readiness(client)
    passed = (
        ready_before == "ready"
        and set(codes) <= {"200", "503 storage_unavailable"}
        and codes["503 storage_unavailable"] > 0
        and set(ready_after_failure) == {"storage_unavailable"}
        and alive == 200
        and ready_after_freeing == "ready"
        and after == 200
        and tracebacks == 0
        and floor_readiness == "storage_low"
    )
    rows = [
        ("file system", f"{args.size_mb} MB" if args.data_dir is None else str(args.data_dir)),
        ("answers", dict(codes)),
        ("first refused upload", first_failure),
        ("/readyz before; after each refusal", f"{ready_before}; {dict(ready_after_failure)}"),
        ("/healthz while full", alive),
        ("/readyz after freeing, before a prediction", ready_after_freeing),
        ("next /predict", after),
        ("tracebacks in the log", tracebacks),
        ("/readyz with the default 64 MB floor", floor_readiness),
        ("result", "PASSED" if passed else "FAILED"),
    ]
    report(
        "full disk under PNEUMOSCAN_DATA_DIR",
        rows,
        {
            "answers": dict(codes),
            "first_refused": first_failure,
            "ready_after_refusal": dict(ready_after_failure),
            "ready_after_freeing": ready_after_freeing,
            "floor_readiness": floor_readiness,
            "tracebacks": tracebacks,
            "passed": passed,
        },
    )
    raise SystemExit(0 if passed else 1)


if __name__ == "__main__":
    main()
