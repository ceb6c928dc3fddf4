"""Who am I, how is the daemon, and what does the API look like."""

from __future__ import annotations

import os
import time
from typing import Any

from aiohttp import web

from autogentoo import API_VERSION, __version__
from autogentoo.daemon.api import router
from autogentoo.daemon.config import Role
from autogentoo.daemon.routing import Ctx, openapi
from autogentoo.daemon.service import DAEMON

V = f"/{API_VERSION}"


@router.route(
    "GET", f"{V}/status", role=Role.VIEWER, summary="Daemon health and load", tag="system"
)
async def get_status(ctx: Ctx) -> dict[str, Any]:
    d = ctx.request.app[DAEMON]
    load1, load5, load15 = os.getloadavg()
    return {
        "version": __version__,
        "api": API_VERSION,
        "pid": os.getpid(),
        "uptime": round(time.time() - d.started, 3),
        "storage": str(d.config.storage.backend),
        "jobs": d.jobs.counts(),
        "roots": d.state.one("SELECT count(*) AS n FROM roots")["n"],  # type: ignore[index]
        "load": [load1, load5, load15],
        "systemd": d.under_systemd,
    }


@router.route(
    "GET",
    f"{V}/whoami",
    role=Role.NONE,
    summary="Who the daemon thinks you are, and your role",
    tag="system",
)
async def get_whoami(ctx: Ctx) -> dict[str, Any]:
    c = ctx.caller
    d = ctx.request.app[DAEMON]
    out: dict[str, Any] = {
        "user": c.user,
        "uid": c.uid,
        "gid": c.gid,
        "groups": list(c.groups),
        "role": str(c.role),
    }
    if c.role is Role.NONE:
        out["hint"] = f"ask an administrator to add you to the {d.config.policy.join_group!r} group"
    return out


@router.route(
    "GET",
    f"{V}/openapi.json",
    role=Role.NONE,
    summary="This API, as an OpenAPI 3 document",
    tag="system",
)
async def get_openapi(ctx: Ctx) -> web.Response:
    d = ctx.request.app[DAEMON]
    if d.openapi_doc is None:
        d.openapi_doc = openapi(router, __version__)
    return web.json_response(d.openapi_doc)
