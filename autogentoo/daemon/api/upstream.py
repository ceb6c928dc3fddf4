"""Inputs from upstream: stage3s, repository snapshots and kernel sources.

Roles: viewers list what was fetched. Builders may fetch: only from the
mirrors the config names, and nothing is kept unless it is signed by a key
of the configured keyring, so a fetch cannot bring anything in that an
admin did not already trust; it only costs disk and bandwidth. Choosing the
snapshot every job mounts, or deleting one, changes what every root sees:
admin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autogentoo import API_VERSION
from autogentoo.daemon import inputs
from autogentoo.daemon.api import router
from autogentoo.daemon.api.common import start_job
from autogentoo.daemon.config import Role
from autogentoo.daemon.jobs import JobContext
from autogentoo.daemon.routing import Ctx, doc_field
from autogentoo.daemon.service import DAEMON, Daemon

V = f"/{API_VERSION}"


def _daemon(ctx: Ctx) -> Daemon:
    return ctx.request.app[DAEMON]


@dataclass(frozen=True)
class Stage3Fetch:
    profile: str = doc_field(
        "stage3 profile as the mirror names it (amd64-openrc, arm64-desktop-systemd, ...)",
        check=inputs.check_profile,
    )


@router.route(
    "POST",
    f"{V}/stage3/fetch",
    role=Role.BUILDER,
    body=Stage3Fetch,
    tag="upstream",
    summary="Fetch and verify the newest stage3 of a profile into the stage3 cache; a job",
)
async def fetch_stage3(ctx: Ctx) -> dict[str, Any]:
    d = _daemon(ctx)
    profile: str = ctx.body.profile

    async def work(job: JobContext) -> None:
        await inputs.fetch_stage3(d, job, profile)

    return start_job(ctx, "stage3-fetch", work=work, params={"profile": profile})


@router.route(
    "GET",
    f"{V}/stage3",
    role=Role.VIEWER,
    tag="upstream",
    summary="List the verified stage3s in the cache, newest first per profile",
)
async def list_stage3(ctx: Ctx) -> list[dict[str, Any]]:
    return inputs.list_stage3s(_daemon(ctx))


@router.route(
    "POST",
    f"{V}/repos/fetch",
    role=Role.BUILDER,
    tag="upstream",
    summary="Fetch and verify the newest gentoo repository snapshot as a squashfs image; a job",
)
async def fetch_repo(ctx: Ctx) -> dict[str, Any]:
    d = _daemon(ctx)

    async def work(job: JobContext) -> None:
        await inputs.fetch_repo(d, job)

    return start_job(ctx, "repo-fetch", work=work)


@router.route(
    "GET",
    f"{V}/repos",
    role=Role.VIEWER,
    tag="upstream",
    summary="List the repository snapshots kept, and which one jobs mount",
)
async def list_repos(ctx: Ctx) -> list[dict[str, Any]]:
    return inputs.list_repos(_daemon(ctx))


@router.route(
    "POST",
    f"{V}/repos/{{name}}/use",
    role=Role.ADMIN,
    tag="upstream",
    summary="Mount this snapshot at /var/db/repos/gentoo in jobs started from now on",
)
async def use_repo(ctx: Ctx) -> dict[str, Any]:
    return inputs.use_repo(_daemon(ctx), ctx.param("name", "snapshot name"))


@router.route(
    "DELETE",
    f"{V}/repos/{{name}}",
    role=Role.ADMIN,
    tag="upstream",
    summary="Delete a repository snapshot that is not in use",
)
async def delete_repo(ctx: Ctx) -> dict[str, Any]:
    return inputs.delete_repo(_daemon(ctx), ctx.param("name", "snapshot name"))


@dataclass(frozen=True)
class KernelFetch:
    version: str = doc_field(
        "kernel release as kernel.org names it (6.1, 6.6.30)", check=inputs.check_kernel_version
    )


@router.route(
    "POST",
    f"{V}/kernels/fetch",
    role=Role.BUILDER,
    body=KernelFetch,
    tag="upstream",
    summary="Fetch and verify a kernel source tarball and unpack it for pack-kernel; a job",
)
async def fetch_kernel(ctx: Ctx) -> dict[str, Any]:
    d = _daemon(ctx)
    version: str = ctx.body.version

    async def work(job: JobContext) -> None:
        await inputs.fetch_kernel(d, job, version)

    return start_job(ctx, "kernel-fetch", work=work, params={"version": version})


@router.route(
    "GET",
    f"{V}/kernels/fetched",
    role=Role.VIEWER,
    tag="upstream",
    summary="List the kernel releases fetched from upstream (with digest and signer)",
)
async def list_fetched_kernels(ctx: Ctx) -> list[dict[str, Any]]:
    return inputs.list_kernels(_daemon(ctx))
