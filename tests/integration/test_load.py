"""200 concurrent clients against a real daemon while a job prints a known sequence.

A quarter of the clients follow the running job's log live (joining at
different times, each from the start); the others loop over status and job
listing. Nothing may fail, every follower must see the job's whole output
in order, and the daemon's memory must stay flat (asserted loosely here; the
figures are in bench/load.py, which uses the same driver for a minute).

File descriptors: the test process holds ~200 sockets and the daemon as many
plus its own; both stay under the usual 1024 soft limit, which the fixture
raises to the hard limit anyway. The daemon's systemd unit sets LimitNOFILE
(a build box with many `agctl logs -f` needs it).
"""

from __future__ import annotations

import asyncio
import random
import resource
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.helpers.daemon import running_daemon
from tests.helpers.stage3 import make_stage3
from tests.integration.test_crashes import create_root, wait_job

pytestmark = pytest.mark.integration


# --- the driver (bench/load.py uses it too) ---------------------------------------------


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)  # seconds, request/response calls
    errors: list[str] = field(default_factory=list)
    follows: list[bytes] = field(default_factory=list)  # what each follower received
    started: float = 0.0
    ended: float = 0.0

    @property
    def rps(self) -> float:
        return len(self.latencies) / max(self.ended - self.started, 1e-9)

    def pct(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


async def _requester(
    session: aiohttp.ClientSession, paths: list[str], deadline: float, stats: Stats
) -> None:
    i = random.randrange(len(paths))
    while time.monotonic() < deadline:
        path = paths[i % len(paths)]
        i += 1
        t0 = time.perf_counter()
        try:
            async with session.get(f"http://autogentoo{path}") as resp:
                await resp.read()
                if resp.status != 200:
                    stats.errors.append(f"GET {path}: {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as e:
            stats.errors.append(f"GET {path}: {type(e).__name__}: {e}")
            continue
        stats.latencies.append(time.perf_counter() - t0)


async def _follower(
    session: aiohttp.ClientSession, job_id: int, delay: float, stats: Stats
) -> None:
    await asyncio.sleep(delay)
    try:
        async with session.get(
            f"http://autogentoo/v1/jobs/{job_id}/log", params={"follow": "true"}
        ) as resp:
            if resp.status != 200:
                stats.errors.append(f"follow {job_id}: {resp.status}")
                return
            stats.follows.append(await resp.read())
    except (aiohttp.ClientError, TimeoutError) as e:
        stats.errors.append(f"follow {job_id}: {type(e).__name__}: {e}")


async def drive(
    sock: str,
    *,
    clients: int,
    duration: float,
    follow_job: int | None = None,
    follow_share: int = 4,
    paths: tuple[str, ...] = ("/v1/status", "/v1/jobs?limit=20"),
) -> Stats:
    """Run `clients` concurrent clients for `duration` seconds; every follow_share-th
    client follows follow_job's log (to its end) instead of looping requests."""
    stats = Stats()
    conn = aiohttp.UnixConnector(path=sock, limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30, sock_connect=30)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        stats.started = time.monotonic()
        deadline = stats.started + duration
        tasks = []
        for n in range(clients):
            if follow_job is not None and n % follow_share == 0:
                delay = random.uniform(0, duration / 2)
                tasks.append(_follower(session, follow_job, delay, stats))
            else:
                tasks.append(_requester(session, list(paths), deadline, stats))
        await asyncio.gather(*tasks)
        stats.ended = time.monotonic()
    return stats


def sequence_job(lines: int, pause: str) -> list[str]:
    """A job printing `line 1` .. `line N`, with a pause between lines."""
    return ["/bin/sh", "-c", f'i=1; while [ $i -le {lines} ]; do echo "line $i"; i=$((i+1)); '
            f"sleep {pause}; done"]  # fmt: skip


def expected_output(lines: int) -> bytes:
    return b"".join(f"line {i}\n".encode() for i in range(1, lines + 1))


# --- the test ------------------------------------------------------------------------------


@pytest.fixture
def nofile() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_200_clients_while_a_job_streams(workdir: Path, nofile: None) -> None:
    stage3 = make_stage3(workdir / "s3")
    lines = 400
    with running_daemon(workdir, {"jobs": {"max_parallel": 2}}) as d:
        create_root(d, "ld", stage3)
        # Warm up every path once, so the baseline includes what a first use allocates.
        asyncio.run(drive(str(d.socket), clients=20, duration=1.0))
        before = rss_kib(d.proc.pid)
        job = d.call("POST", "/roots/ld/run", body={"argv": sequence_job(lines, "0.05")})
        stats = asyncio.run(drive(str(d.socket), clients=200, duration=20.0, follow_job=job["id"]))
        row = wait_job(d, job)
        after = rss_kib(d.proc.pid)
        assert row["state"] == "succeeded", row
        assert stats.errors == [], stats.errors[:20]
        want = expected_output(lines)
        assert len(stats.follows) == 50
        bad = [i for i, got in enumerate(stats.follows) if got != want]
        assert not bad, f"{len(bad)} follower(s) got incomplete or reordered output"
        assert len(stats.latencies) > 1000
        # Flat, loosely: a leak per request (~10^4 of them) would blow well past this.
        assert after < 2 * before + 64 * 1024, (before, after)
        assert d.call("GET", "/status")["jobs"]["running"] == 0
        _report(stats, before, after)


def _report(stats: Stats, before: int, after: int) -> None:
    print(
        f"\n{len(stats.latencies)} requests, {stats.rps:.0f}/s, p50 {stats.p50 * 1000:.1f} ms,"
        f" p99 {stats.pct(99) * 1000:.1f} ms; {len(stats.follows)} followers;"
        f" daemon RSS {before} -> {after} KiB"
    )
