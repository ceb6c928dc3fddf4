"""Uploads: stream a file to the daemon once, then name it by id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autogentoo import API_VERSION
from autogentoo.daemon import uploads as uploads_mod
from autogentoo.daemon.api import router
from autogentoo.daemon.config import Role
from autogentoo.daemon.routing import Ctx, doc_field
from autogentoo.daemon.service import DAEMON
from autogentoo.errors import InvalidArgument

V = f"/{API_VERSION}/uploads"


def _filename(untrusted: str) -> str:
    # Only a label (it names the file in DIGESTS); never used as a path.
    if not untrusted or len(untrusted) > 255 or "/" in untrusted or "\0" in untrusted:
        raise InvalidArgument(f"{untrusted[:60]!r} is not a file name")
    return untrusted


@dataclass(frozen=True)
class UploadQuery:
    filename: str = doc_field("the file's name, as DIGESTS files list it", check=_filename)


@router.route(
    "PUT",
    V,
    role=Role.BUILDER,
    query=UploadQuery,
    upload=True,
    tag="uploads",
    summary="Upload a file (stage3, script, config) as a stream; returns its id",
)
async def put_upload(ctx: Ctx) -> dict[str, Any]:
    d = ctx.request.app[DAEMON]
    up = await uploads_mod.receive(
        ctx.request,
        d.config.uploads_dir,
        d.state,
        ctx.caller,
        ctx.query.filename,
        d.config.limits.max_upload,
    )
    return up.json()


@router.route("GET", V, role=Role.BUILDER, summary="List your uploads", tag="uploads")
async def list_uploads(ctx: Ctx) -> list[dict[str, Any]]:
    d = ctx.request.app[DAEMON]
    rows = d.state.all(
        "SELECT * FROM uploads WHERE owner_uid=? ORDER BY created", (ctx.caller.uid,)
    )
    return [
        {"id": r["id"], "size": r["size"], "sha256": r["sha256"], "filename": r["filename"]}
        for r in rows
    ]


@router.route("DELETE", V + "/{id}", role=Role.BUILDER, summary="Delete an upload", tag="uploads")
async def delete_upload(ctx: Ctx) -> dict[str, Any]:
    d = ctx.request.app[DAEMON]
    up = uploads_mod.get(d.state, d.config.uploads_dir, ctx.request.match_info["id"], ctx.caller)
    uploads_mod.delete(d.state, up)
    return {"deleted": up.id}
