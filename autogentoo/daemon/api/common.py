"""What many endpoints share: starting a job for the caller and answering with it."""

from __future__ import annotations

from typing import Any

from autogentoo.daemon.jobs import Lock, Work, job_json
from autogentoo.daemon.routing import Ctx
from autogentoo.daemon.service import DAEMON


def start_job(
    ctx: Ctx,
    kind: str,
    *,
    work: Work,
    root: str | None = None,
    lock: Lock = Lock.NONE,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Queue work as a job owned by the caller; the answer is the job as it stands."""
    jobs = ctx.request.app[DAEMON].jobs
    job = jobs.submit(
        kind, owner_uid=ctx.caller.uid, work=work, root=root, lock=lock, params=params
    )
    return job_json(jobs.get_row(job.id))
