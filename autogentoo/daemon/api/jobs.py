"""Jobs: list, show, follow the log, cancel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from autogentoo import API_VERSION
from autogentoo.daemon.api import router
from autogentoo.daemon.config import Role
from autogentoo.daemon.joblog import follow
from autogentoo.daemon.jobs import JobState, job_json
from autogentoo.daemon.routing import Ctx, doc_field
from autogentoo.daemon.service import DAEMON
from autogentoo.errors import Forbidden, InvalidArgument
from autogentoo.names import check_name

V = f"/{API_VERSION}/jobs"


@dataclass(frozen=True)
class JobsQuery:
    root: str | None = doc_field(
        "only jobs on this root", default=None, check=lambda v: check_name(v, "root name")
    )
    state: str | None = doc_field("only jobs in this state", default=None)
    limit: int = doc_field("at most this many, newest first", default=50)


@router.route(
    "GET", V, role=Role.VIEWER, query=JobsQuery, summary="List jobs, newest first", tag="jobs"
)
async def list_jobs(ctx: Ctx) -> list[dict[str, Any]]:
    d = ctx.request.app[DAEMON]
    q: JobsQuery = ctx.query
    if q.state is not None and q.state not in {s.value for s in JobState}:
        raise InvalidArgument(
            f"{q.state!r} is not a job state ({', '.join(s.value for s in JobState)})"
        )
    if not 1 <= q.limit <= 1000:
        raise InvalidArgument("limit must be between 1 and 1000")
    sql, args = "SELECT * FROM jobs WHERE 1=1", list[Any]()
    if q.root is not None:
        sql += " AND root=?"
        args.append(q.root)
    if q.state is not None:
        sql += " AND state=?"
        args.append(q.state)
    sql += " ORDER BY id DESC LIMIT ?"
    args.append(q.limit)
    return [job_json(r) for r in d.state.all(sql, args)]


@router.route("GET", V + "/{id}", role=Role.VIEWER, summary="Show a job", tag="jobs")
async def show_job(ctx: Ctx) -> dict[str, Any]:
    d = ctx.request.app[DAEMON]
    return job_json(d.jobs.get_row(ctx.int_param("id", "job id")))


@dataclass(frozen=True)
class LogQuery:
    follow: bool = doc_field("keep streaming until the job ends", default=False)
    offset: int = doc_field("start at this byte of the log", default=0)


@router.route(
    "GET",
    V + "/{id}/log",
    role=Role.VIEWER,
    query=LogQuery,
    produces="text/plain",
    summary="A job's log, streamed; with follow=true until the job ends",
    tag="jobs",
)
async def job_log(ctx: Ctx) -> web.StreamResponse:
    d = ctx.request.app[DAEMON]
    job_id = ctx.int_param("id", "job id")
    d.jobs.get_row(job_id)
    q: LogQuery = ctx.query
    if q.offset < 0:
        raise InvalidArgument("offset must not be negative")
    live = d.jobs.live.get(job_id)
    resp = web.StreamResponse(
        headers={"Content-Type": "text/plain; charset=utf-8", "X-Request-Id": ctx.request_id}
    )
    resp.enable_chunked_encoding()
    await resp.prepare(ctx.request)
    async for chunk in follow(
        d.jobs.log_path(job_id), live.ctx.log if live and q.follow else None, q.offset
    ):
        await resp.write(chunk)
    await resp.write_eof()
    return resp


@router.route("POST", V + "/{id}/cancel", role=Role.BUILDER, summary="Cancel a job", tag="jobs")
async def cancel_job(ctx: Ctx) -> dict[str, Any]:
    d = ctx.request.app[DAEMON]
    job_id = ctx.int_param("id", "job id")
    row = d.jobs.get_row(job_id)
    if row["owner_uid"] != ctx.caller.uid and not ctx.caller.is_admin:
        raise Forbidden(f"job {job_id} is not yours to cancel")
    outcome = d.jobs.cancel(job_id)
    return {"id": job_id, "outcome": outcome}
