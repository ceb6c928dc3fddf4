"""Jobs: every operation that takes time, queued, run, recorded and followed.

A job is a row in the state database, a log file, and while it is alive an
asyncio task. Jobs that mutate a root take its lock exclusively, jobs that
only read it (packing) take it shared; different roots run in parallel up to
`jobs.max_parallel`. Queued jobs start in submission order: a job never
overtakes an earlier one that wants a conflicting lock on the same root.

States: queued -> running -> succeeded | failed | cancelled, and
interrupted for whatever was queued or running when the daemon stopped or
died. A job's history and log survive the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from autogentoo.daemon import faults
from autogentoo.daemon import state as st
from autogentoo.daemon.joblog import JobLog
from autogentoo.errors import AgError, Code, Conflict, NoSpace, NotFound

log = logging.getLogger(__name__)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def finished(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


class Lock(StrEnum):
    NONE = "none"
    SHARED = "shared"
    EXCLUSIVE = "exclusive"


@dataclass
class JobContext:
    """What a job's work function gets: its id, log, parameters and a result dict."""

    id: int
    root: str | None
    log: JobLog
    params: dict[str, Any]
    result: dict[str, Any] = field(default_factory=dict)


Work = Callable[[JobContext], Awaitable[None]]


@dataclass
class LiveJob:
    id: int
    kind: str
    root: str | None
    lock: Lock
    work: Work
    ctx: JobContext
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # Jobs that must run even when the parallel limit is reached because
    # they are cheap and interactive (none yet, but the scheduler allows it).
    state: JobState = JobState.QUEUED


@dataclass
class _RootLock:
    shared: int = 0
    exclusive: bool = False

    def can(self, mode: Lock) -> bool:
        if mode is Lock.EXCLUSIVE:
            return not self.exclusive and self.shared == 0
        if mode is Lock.SHARED:
            return not self.exclusive
        return True

    def take(self, mode: Lock) -> None:
        if mode is Lock.EXCLUSIVE:
            self.exclusive = True
        elif mode is Lock.SHARED:
            self.shared += 1

    def release(self, mode: Lock) -> None:
        if mode is Lock.EXCLUSIVE:
            self.exclusive = False
        elif mode is Lock.SHARED:
            self.shared -= 1


class JobManager:
    def __init__(self, state: st.State, logs_dir: Path, max_parallel: int) -> None:
        self.state = state
        self.logs_dir = logs_dir
        self.max_parallel = max_parallel
        self.live: dict[int, LiveJob] = {}
        self._pending: list[LiveJob] = []
        self._locks: dict[str, _RootLock] = {}
        self._running = 0
        self._stopping = False
        # Bumped whenever a job that may write a root ends: anything cached
        # about a root's tree (pack-root's walk) is keyed on it.
        self._generations: dict[str, int] = {}
        logs_dir.mkdir(parents=True, exist_ok=True, mode=0o750)

    # --- lifecycle ---------------------------------------------------------

    def recover(self) -> list[int]:
        """Mark what a previous daemon left queued or running as interrupted."""
        rows = self.state.all(
            "SELECT id FROM jobs WHERE state IN (?, ?)", (JobState.QUEUED, JobState.RUNNING)
        )
        ids = [int(r["id"]) for r in rows]
        if ids:
            with self.state.transaction() as db:
                for job_id in ids:
                    db.execute(
                        "UPDATE jobs SET state=?, ended=?, error_code=?, error=? WHERE id=?",
                        (
                            JobState.INTERRUPTED,
                            st.now(),
                            Code.UNAVAILABLE,
                            "the daemon stopped while this job was queued or running",
                            job_id,
                        ),
                    )
            for job_id in ids:
                with contextlib.suppress(OSError), open(self.log_path(job_id), "ab") as f:
                    f.write(b"\n*** interrupted: the daemon stopped during this job\n")
            log.warning("marked %d job(s) from a previous run as interrupted", len(ids))
        return ids

    async def stop(self) -> None:
        """Stop taking work; interrupt what runs and what waits."""
        self._stopping = True
        for job in list(self._pending):
            self._finish_row(
                job,
                JobState.INTERRUPTED,
                None,
                AgError("the daemon stopped before this job started", code=Code.UNAVAILABLE),
            )
            job.ctx.log.close()
            job.done.set()
        self._pending.clear()
        tasks = [j.task for j in self.live.values() if j.task is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- submission ---------------------------------------------------------

    def log_path(self, job_id: int) -> Path:
        return self.logs_dir / f"{job_id}.log"

    def submit(
        self,
        kind: str,
        *,
        owner_uid: int,
        work: Work,
        root: str | None = None,
        lock: Lock = Lock.NONE,
        params: dict[str, Any] | None = None,
    ) -> LiveJob:
        if self._stopping:
            raise AgError("the daemon is stopping; try again shortly", code=Code.UNAVAILABLE)
        params = params or {}
        cur = self.state.execute(
            "INSERT INTO jobs (kind, root, owner_uid, state, created, params) VALUES (?,?,?,?,?,?)",
            (kind, root, owner_uid, JobState.QUEUED, st.now(), st.dumps(params)),
        )
        job_id = int(cur.lastrowid or 0)
        ctx = JobContext(job_id, root, JobLog(self.log_path(job_id)), params)
        job = LiveJob(job_id, kind, root, lock, work, ctx)
        self.live[job_id] = job
        self._pending.append(job)
        self._schedule()
        return job

    def _schedule(self) -> None:
        blocked_roots: set[str] = set()
        for job in list(self._pending):
            if self._running >= self.max_parallel:
                return
            if job.root is not None:
                lk = self._locks.setdefault(job.root, _RootLock())
                if job.root in blocked_roots or not lk.can(job.lock):
                    # Later jobs on this root wait behind this one: in order.
                    blocked_roots.add(job.root)
                    continue
                lk.take(job.lock)
            self._pending.remove(job)
            self._running += 1
            job.state = JobState.RUNNING
            self.state.execute(
                "UPDATE jobs SET state=?, started=? WHERE id=?",
                (JobState.RUNNING, st.now(), job.id),
            )
            job.task = asyncio.get_running_loop().create_task(self._run(job), name=f"job-{job.id}")

    async def _run(self, job: LiveJob) -> None:
        extra = {"JOB": job.id, "ROOT": job.root or "-"}
        log.info("job %d (%s) started", job.id, job.kind, extra=extra)
        final: JobState
        error: AgError | None = None
        try:
            await faults.point("job.running")
            await job.work(job.ctx)
            final = JobState.SUCCEEDED
        except asyncio.CancelledError:
            if self._stopping:
                final = JobState.INTERRUPTED
                error = AgError("the daemon stopped during this job", code=Code.UNAVAILABLE)
            else:
                final = JobState.CANCELLED
                error = AgError("cancelled", code=Code.JOB_FAILED)
        except AgError as e:
            final, error = JobState.FAILED, e
        except Exception as e:
            log.exception("job %d crashed", job.id, extra=extra)
            final = JobState.FAILED
            error = AgError(f"internal error: {type(e).__name__}: {e}", code=Code.INTERNAL)
        if job.ctx.log.lost and final in (JobState.SUCCEEDED, JobState.FAILED):
            # Its output is incomplete: the job cannot count as done, and the
            # cause to report is the disk, whatever the work said after it.
            final = JobState.FAILED
            error = NoSpace(
                f"no space left for the job's log in {self.logs_dir};"
                f" {job.ctx.log.lost} bytes of output were lost"
            )
        # A command's own non-zero exit is in the job's state and returncode;
        # a trailer line would land in `agctl run`'s output as if the command
        # had printed it.
        if error is not None and "returncode" not in error.details:
            job.ctx.log.line(f"*** {final}: {error.message}")
        job.ctx.log.close()
        if job.root is not None:
            self._locks[job.root].release(job.lock)
            if job.lock is Lock.EXCLUSIVE:
                self._generations[job.root] = self._generations.get(job.root, 0) + 1
        self._running -= 1
        job.state = final
        self._record_end(job, final, job.ctx.result.get("returncode"), error)
        job.done.set()
        self.live.pop(job.id, None)
        log.info("job %d %s", job.id, final, extra=extra)
        if not self._stopping:
            self._schedule()

    def _record_end(
        self, job: LiveJob, final: JobState, returncode: Any, error: AgError | None
    ) -> None:
        """Record the job's end; on a full disk, retry until there is room again.

        The job has ended either way (its root released, waiters woken); only
        its row lags. If the daemon stops first, the next start marks it
        interrupted.
        """
        try:
            self._finish_row(job, final, returncode, error)
        except (sqlite3.Error, NoSpace) as e:
            log.error("cannot record the end of job %d (%s); retrying", job.id, e)
            if not self._stopping:
                asyncio.get_running_loop().call_later(
                    5, self._record_end, job, final, returncode, error
                )

    def _finish_row(
        self, job: LiveJob, final: JobState, returncode: Any, error: AgError | None
    ) -> None:
        self.state.execute(
            "UPDATE jobs SET state=?, ended=?, returncode=?, error_code=?, error=?, result=?"
            " WHERE id=?",
            (
                final,
                st.now(),
                returncode,
                str(error.code) if error else None,
                error.message if error else None,
                st.dumps(job.ctx.result),
                job.id,
            ),
        )

    # --- control and queries ---------------------------------------------------

    def cancel(self, job_id: int) -> str:
        job = self.live.get(job_id)
        if job is None:
            row = self.get_row(job_id)
            raise Conflict(
                f"job {job_id} has already finished ({row['state']})", state=row["state"]
            )
        if job in self._pending:
            self._pending.remove(job)
            job.ctx.log.line("*** cancelled before it started")
            job.ctx.log.close()
            job.state = JobState.CANCELLED
            self._finish_row(
                job,
                JobState.CANCELLED,
                None,
                AgError("cancelled before it started", code=Code.JOB_FAILED),
            )
            job.done.set()
            self.live.pop(job_id, None)
            self._schedule()
            return "cancelled"
        assert job.task is not None
        job.task.cancel()
        return "cancelling"

    def get_row(self, job_id: int) -> Any:
        row = self.state.one("SELECT * FROM jobs WHERE id=?", (job_id,))
        if row is None:
            raise NotFound(f"there is no job {job_id}", job=job_id)
        return row

    def generation(self, root: str) -> int:
        return self._generations.get(root, 0)

    def running_on(self, root: str) -> list[LiveJob]:
        return [j for j in self.live.values() if j.root == root]

    def counts(self) -> dict[str, int]:
        return {
            "running": self._running,
            "queued": len(self._pending),
            "max_parallel": self.max_parallel,
        }


def job_json(row: Any) -> dict[str, Any]:
    out = {
        "id": row["id"],
        "kind": row["kind"],
        "root": row["root"],
        "owner_uid": row["owner_uid"],
        "state": row["state"],
        "created": row["created"],
        "started": row["started"],
        "ended": row["ended"],
        "returncode": row["returncode"],
        "params": st.loads(row["params"]),
        "result": st.loads(row["result"]),
    }
    if row["error_code"]:
        out["error"] = {"code": row["error_code"], "message": row["error"]}
    return out
