"""The daemon under load, next to a bare aiohttp handler. Run as root:

    python bench/load.py [--clients 200] [--duration 60]

(a) the real daemon: `clients` concurrent clients for `duration` seconds, a
    quarter of them following a running job's log live, the rest looping
    over GET /v1/status and GET /v1/jobs?limit=20 (the driver of
    tests/integration/test_load.py);
(b) a bare aiohttp app in its own process on the same kind of UNIX socket,
    answering the same two paths with a small JSON body, under the same
    requesting clients (no followers: it has no logs).
Prints requests per second, p50/p99 latency, the daemon's RSS before and
after, and the ratios daemon/bare. No assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.daemon import running_daemon
from tests.helpers.stage3 import make_stage3
from tests.integration.test_crashes import create_root, wait_job
from tests.integration.test_load import (
    Stats,
    drive,
    expected_output,
    rss_kib,
    sequence_job,
)

BARE = r"""
import os, sys, time
from aiohttp import web

async def status(request):
    return web.json_response({"version": "0", "api": "v1", "pid": os.getpid(),
                              "uptime": time.time(), "jobs": {"running": 1, "queued": 0}})

async def jobs(request):
    return web.json_response([{"id": i, "kind": "run", "state": "succeeded"} for i in range(3)])

app = web.Application()
app.router.add_get("/v1/status", status)
app.router.add_get("/v1/jobs", jobs)
web.run_app(app, path=sys.argv[1], print=None, access_log=None)
"""


def line(name: str, s: Stats) -> str:
    return (
        f"{name:<28} {len(s.latencies):>8} {s.rps:>9.0f} {s.p50 * 1000:>9.1f} "
        f"{s.pct(99) * 1000:>9.1f} {len(s.errors):>7}"
    )


def bare(tmp: Path, clients: int, duration: float) -> tuple[Stats, int, int]:
    sock = tmp / "bare.sock"
    proc = subprocess.Popen([sys.executable, "-c", BARE, str(sock)])
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the bare aiohttp server did not start")
            time.sleep(0.02)
        asyncio.run(drive(str(sock), clients=20, duration=1.0))
        before = rss_kib(proc.pid)
        stats = asyncio.run(drive(str(sock), clients=clients, duration=duration))
        return stats, before, rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--duration", type=float, default=60.0)
    args = p.parse_args()
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    tmp = Path(tempfile.mkdtemp(prefix="agt-bench-load-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    try:
        stage3 = make_stage3(tmp / "s3")
        # A line every 50 ms for the whole run, so followers are live throughout.
        lines = int(args.duration / 0.05 * 0.9)
        with running_daemon(tmp / "d", {"jobs": {"max_parallel": 2}}) as d:
            create_root(d, "bench", stage3)
            asyncio.run(drive(str(d.socket), clients=20, duration=1.0))
            d_before = rss_kib(d.proc.pid)
            job = d.call("POST", "/roots/bench/run", body={"argv": sequence_job(lines, "0.05")})
            ds = asyncio.run(
                drive(str(d.socket), clients=args.clients, duration=args.duration,
                      follow_job=job["id"])
            )  # fmt: skip
            wait_job(d, job, timeout=args.duration * 3)
            d_after = rss_kib(d.proc.pid)
            want = expected_output(lines)
            complete = sum(got == want for got in ds.follows)
        bs, b_before, b_after = bare(tmp, args.clients, args.duration)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.clients} clients for {args.duration:.0f} s (1 in 4 following a job's log)")
    print(f"{'':<28} {'requests':>8} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}")
    print(line("autogentoo daemon", ds))
    print(line("bare aiohttp handler", bs))
    print(f"followers complete and in order: {complete}/{len(ds.follows)}")
    print(f"daemon RSS: {d_before} KiB -> {d_after} KiB ({(d_after - d_before) / 1024:+.1f} MiB)")
    print(f"bare RSS:   {b_before} KiB -> {b_after} KiB")
    print(
        f"ratio daemon/bare: req/s {ds.rps / bs.rps:.2f}, p50 {ds.p50 / bs.p50:.2f},"
        f" p99 {ds.pct(99) / bs.pct(99):.2f}"
    )


if __name__ == "__main__":
    main()
