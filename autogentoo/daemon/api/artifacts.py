"""Artefacts: list, show, download (streamed, with Range), delete."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from autogentoo import API_VERSION
from autogentoo.daemon.api import router
from autogentoo.daemon.artifacts import Artifact
from autogentoo.daemon.config import Role
from autogentoo.daemon.routing import Ctx, doc_field
from autogentoo.daemon.service import DAEMON
from autogentoo.errors import Forbidden, InvalidArgument, NotFound
from autogentoo.names import check_name

V = f"/{API_VERSION}/artifacts"


@dataclass(frozen=True)
class ArtifactsQuery:
    root: str | None = doc_field(
        "only artefacts of this root", default=None, check=lambda v: check_name(v, "root name")
    )
    kind: str | None = doc_field(
        "only artefacts of this kind", default=None, check=lambda v: check_name(v, "kind")
    )
    limit: int = doc_field("at most this many, newest first", default=100)


@router.route(
    "GET",
    V,
    role=Role.VIEWER,
    query=ArtifactsQuery,
    tag="artifacts",
    summary="List artefacts, newest first",
)
async def list_artifacts(ctx: Ctx) -> list[dict[str, Any]]:
    d = ctx.request.app[DAEMON]
    q: ArtifactsQuery = ctx.query
    if not 1 <= q.limit <= 1000:
        raise InvalidArgument("limit must be between 1 and 1000")
    return [a.json() for a in d.artifacts.find(root=q.root, kind=q.kind, limit=q.limit)]


@router.route("GET", V + "/{id}", role=Role.VIEWER, tag="artifacts", summary="Show an artefact")
async def show_artifact(ctx: Ctx) -> dict[str, Any]:
    d = ctx.request.app[DAEMON]
    return d.artifacts.get(ctx.request.match_info["id"]).json()


@dataclass(frozen=True)
class FileQuery:
    file: str | None = doc_field(
        "which of the artefact's files (default: the main one)", default=None
    )


@router.route(
    "GET",
    V + "/{id}/content",
    role=Role.VIEWER,
    query=FileQuery,
    produces="application/octet-stream",
    tag="artifacts",
    summary="Download an artefact's file (streamed; Range requests work)",
)
async def artifact_content(ctx: Ctx) -> web.StreamResponse:
    d = ctx.request.app[DAEMON]
    art = d.artifacts.get(ctx.request.match_info["id"])
    if art.parts and ctx.query.file is None:
        return await _stream_parts(ctx, art)
    name = ctx.query.file or art.files[0]
    # Only names the store itself recorded: the client never names a path.
    if name not in art.files:
        raise NotFound(
            f"artefact {art.id} has no file {name[:80]!r} (it has: {', '.join(art.files)})"
        )
    return web.FileResponse(
        art.dir / name,
        chunk_size=1 << 20,
        headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "X-Request-Id": ctx.request_id,
        },
    )


@router.route(
    "DELETE",
    V + "/{id}",
    role=Role.BUILDER,
    tag="artifacts",
    summary="Delete an artefact (yours, or any as admin)",
)
async def delete_artifact(ctx: Ctx) -> dict[str, Any]:
    d = ctx.request.app[DAEMON]
    art = d.artifacts.get(ctx.request.match_info["id"])
    if art.owner_uid != ctx.caller.uid and not ctx.caller.is_admin:
        raise Forbidden(f"artefact {art.id} is not yours to delete")
    d.artifacts.delete(art)
    return {"deleted": art.id}


async def _stream_parts(ctx: Ctx, art: Artifact) -> web.StreamResponse:
    """A layered initramfs: its members back to back, which is the archive."""
    resp = web.StreamResponse(
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{art.name}"',
            "X-Request-Id": ctx.request_id,
        }
    )
    resp.content_length = sum((art.dir / f).stat().st_size for f in art.files)
    await resp.prepare(ctx.request)
    loop = asyncio.get_running_loop()
    for part in art.files:
        with open(art.dir / part, "rb") as f:
            while chunk := await loop.run_in_executor(None, f.read, 1 << 20):
                await resp.write(chunk)
    await resp.write_eof()
    return resp
