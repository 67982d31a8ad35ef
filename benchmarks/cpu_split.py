"""Where the CPU goes while many clients post: per-thread CPU of the service under wrk load.

    python -m benchmarks.cpu_split [--clients 32] [--seconds 10]

Starts `pneumoscan serve` on loopback, drives it with wrk (C, one thread) posting a 224 px JPEG,
and reads /proc before and after: the whole machine's busy share, the server's event-loop thread
(the process's main thread), TensorFlow's compute threads (the model), the server's other
threads (decode pool, audit writer, executors) and wrk itself. It turns them into CPU ms per
request, and from those into the throughput the machine could give if every core were busy:
cores / (model + Python + client CPU per request). Server-side stage means (decode, queue,
inference, total, batch size) come from the responses' own `timings`.

This explains the service benchmark's 32-client ratio; it is not a target of its own. Run it on
an otherwise idle machine: the busy share counts every process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import SHARED, default_store, report, running_server, wrk_script

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

WRK_TIMINGS = """
local f = io.open("{body}", "rb"); wrk.body = f:read("*all"); f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "{content_type}"
wrk.headers["X-API-Key"] = "{key}"
n, decode, queue, infer, total, batch = 0, 0, 0, 0, 0, 0
local threads = {{}}
setup = function(thread) table.insert(threads, thread) end
response = function(status, headers, body)
  local d, q, i, t, b = body:match('"decode_ms":([%d.]+),"queue_ms":([%d.]+),'
    .. '"inference_ms":([%d.]+),"total_ms":([%d.]+),"batch_size":(%d+)')
  if d then
    n = n + 1; decode = decode + d; queue = queue + q; infer = infer + i
    total = total + t; batch = batch + b
  end
end
done = function(summary, latency, requests)
  local t = threads[1]
  local count = math.max(t:get("n"), 1)
  io.write(string.format("RESULT %d %d %d %.3f %.3f %.3f %.3f %.3f %.3f %.3f %.2f\\n",
    summary.requests, summary.duration, summary.errors.status + summary.errors.connect
      + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    t:get("decode") / count, t:get("queue") / count, t:get("infer") / count,
    t:get("total") / count, t:get("batch") / count, latency.mean / 1000))
end
"""


def thread_ticks(pid: int) -> dict[tuple[int, str], int]:
    """utime + stime of every thread of `pid`, keyed by (thread id, name)."""
    ticks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks[(int(task.name), name)] = int(fields[11]) + int(fields[12])
    return ticks


def machine_ticks() -> tuple[int, int]:
    """(all, idle + iowait) jiffies of the whole machine."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values), values[3] + values[4]


def split(pid: int, before: dict, after: dict, seconds: float) -> dict[str, float]:
    """Per-group CPU share (% of one core) between two samples of `thread_ticks`."""
    groups = {"event_loop": 0.0, "model": 0.0, "other_threads": 0.0}
    for (tid, name), ticks in after.items():
        used = (ticks - before.get((tid, name), 0)) / CLOCK_TICKS / seconds * 100
        if tid == pid:
            groups["event_loop"] += used
        elif name.startswith("tf_"):
            groups["model"] += used
        else:
            groups["other_threads"] += used
    return {key: round(value, 1) for key, value in groups.items()}


def measure(url: str, pid: int, clients: int, seconds: float) -> dict:
    data = (SHARED / "chest_xray" / "train" / "NORMAL" / "IM-0115-0001.jpeg").read_bytes()
    with tempfile.TemporaryDirectory() as folder:
        script = wrk_script(Path(folder), WRK_TIMINGS, data)
        command = ["wrk", "-t1", f"-c{clients}", "--timeout", "30s", "-s", str(script)]
        # Warm the connections, the batcher and the caches first.
        subprocess.run([*command, "-d3s", f"{url}/predict"], capture_output=True, check=True)
        server_before, machine_before = thread_ticks(pid), machine_ticks()
        started = time.perf_counter()
        wrk = subprocess.Popen(
            [*command, f"-d{seconds:g}s", f"{url}/predict"], stdout=subprocess.PIPE, text=True
        )
        time.sleep(0.1)
        wrk_before = sum(thread_ticks(wrk.pid).values())
        time.sleep(max(0.5, seconds - 0.6))
        wrk_after = sum(thread_ticks(wrk.pid).values())
        server_after, machine_after = thread_ticks(pid), machine_ticks()
        elapsed = time.perf_counter() - started
        out, _ = wrk.communicate(timeout=60)
    fields = next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1:]
    requests, duration_us, errors = (int(v) for v in fields[:3])
    p50, p95, decode, queue, inference, total, batch, mean = (float(v) for v in fields[3:])
    per_s = requests / (duration_us / 1e6)
    groups = split(pid, server_before, server_after, elapsed)
    groups["wrk"] = round((wrk_after - wrk_before) / CLOCK_TICKS / (elapsed - 0.6) * 100, 1)
    all_ticks = machine_after[0] - machine_before[0]
    busy = 100 * os.cpu_count() * (1 - (machine_after[1] - machine_before[1]) / all_ticks)
    per_request = {key: round(share * 10 / per_s, 3) for key, share in groups.items()}
    python_ms = per_request["event_loop"] + per_request["other_threads"]
    cpu_ms = per_request["model"] + python_ms + per_request["wrk"]
    return {
        "clients": clients,
        "images_per_s": round(per_s, 1),
        "errors": errors,
        "p50_ms": p50,
        "p95_ms": p95,
        "mean_ms": mean,
        "machine_busy_pct": round(busy, 1),
        "cpu_pct": groups,
        "cpu_ms_per_request": per_request,
        "python_ms_per_request": round(python_ms, 3),
        "cpu_bound_images_per_s": round(os.cpu_count() * 1000 / cpu_ms, 1),
        "server_timings_mean_ms": {
            "decode": decode,
            "queue": queue,
            "inference": inference,
            "total": total,
            "batch_size": batch,
        },
    }


def run(clients: int, seconds: float) -> dict:
    with (
        tempfile.TemporaryDirectory() as data_dir,
        running_server(default_store(), Path(data_dir)) as server,
    ):
        result = measure(server["url"], server["pid"], clients, seconds)
    cpu, per = result["cpu_pct"], result["cpu_ms_per_request"]
    timings = result["server_timings_mean_ms"]
    rows = [
        ("clients, images/s, errors", f"{clients}, {result['images_per_s']}, {result['errors']}"),
        (
            "latency p50 / p95 / mean (ms)",
            f"{result['p50_ms']} / {result['p95_ms']} / {result['mean_ms']}",
        ),
        (f"machine busy (% of {os.cpu_count() * 100})", result["machine_busy_pct"]),
        (
            "CPU %: event loop, model threads, other server threads, wrk",
            f"{cpu['event_loop']}, {cpu['model']}, {cpu['other_threads']}, {cpu['wrk']}",
        ),
        (
            "CPU ms per request: model, Python (loop + others), wrk",
            f"{per['model']}, {result['python_ms_per_request']}, {per['wrk']}",
        ),
        ("throughput with every core busy (images/s)", result["cpu_bound_images_per_s"]),
        (
            "server means (ms): decode, queue, inference, total; batch",
            f"{timings['decode']}, {timings['queue']}, {timings['inference']}, "
            f"{timings['total']}; {timings['batch_size']}",
        ),
    ]
    report("CPU split under load", rows, result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    run(args.clients, args.seconds)
