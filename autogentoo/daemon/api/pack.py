"""pack-root: a root plus config/common plus overlays, as a reproducible initramfs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autogentoo import API_VERSION
from autogentoo.daemon import packing
from autogentoo.daemon import roots as roots_mod
from autogentoo.daemon.api import router
from autogentoo.daemon.api.common import start_job
from autogentoo.daemon.config import Role
from autogentoo.daemon.jobs import JobContext, Lock
from autogentoo.daemon.packroot import Compression
from autogentoo.daemon.routing import Ctx, doc_field, name_field
from autogentoo.daemon.service import DAEMON
from autogentoo.errors import InvalidArgument


def _compression(value: str) -> str:
    try:
        return str(Compression(value))
    except ValueError:
        raise InvalidArgument(
            f"{value!r} is not a compression (one of: {', '.join(c.value for c in Compression)})"
        ) from None


def _pattern(value: str) -> str:
    if not value or value.startswith("/") or "\0" in value or len(value) > 256:
        raise InvalidArgument(f"{value[:60]!r} is not an exclusion pattern (relative glob)")
    return value


@dataclass(frozen=True)
class PackBody:
    hardware: str | None = name_field(
        "hardware overlay (config/overlays/hardware/NAME)", default=None
    )
    secret_sauce: str | None = name_field(
        "secret-sauce overlay (config/overlays/secret-sauce/NAME)", default=None
    )
    compress: str = doc_field(
        "gzip (pigz), zstd, xz, lz4 or none", default="gzip", check=_compression
    )
    level: int | None = doc_field("compression level", default=None)
    layered: bool = doc_field(
        "one cached compressed member per layer, concatenated (the kernel accepts that);"
        " false gives the single archive a kernel embeds",
        default=True,
    )
    exclude: list[str] = doc_field(
        "extra exclusion globs; '!glob' re-includes", default=[], check=_pattern
    )
    epoch: int | None = doc_field(
        "SOURCE_DATE_EPOCH (default: when the root was created)", default=None
    )
    rescan: bool = doc_field("walk the root even if the daemon saw no job change it", default=False)


@router.route(
    "POST",
    f"/{API_VERSION}/roots/{{name}}/pack",
    role=Role.BUILDER,
    body=PackBody,
    tag="artifacts",
    summary="Pack the root and overlays into an initramfs artefact; a job",
)
async def pack_root(ctx: Ctx) -> dict[str, Any]:
    d = ctx.request.app[DAEMON]
    root = roots_mod.get(d, ctx.param("name", "root name"))
    roots_mod.check_access(ctx.caller, root, write=True)
    roots_mod.usable(root)
    b: PackBody = ctx.body
    request = packing.PackRequest(
        hardware=b.hardware,
        secret_sauce=b.secret_sauce,
        compress=Compression(b.compress),
        level=b.level,
        layered=b.layered,
        exclude=tuple(b.exclude),
        epoch=b.epoch,
        rescan=b.rescan,
    )
    layers = packing.layers_for(d, root, request)  # refuse missing overlays before queueing

    async def work(job: JobContext) -> None:
        await packing.pack_root(d, job, root, layers, request, owner_uid=ctx.caller.uid)

    return start_job(
        ctx,
        "pack-root",
        work=work,
        root=root.name,
        lock=Lock.SHARED,
        params={"name": root.name, **request.json()},
    )
