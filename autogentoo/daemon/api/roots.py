"""Roots: create from a stage3, list, show, snapshot, clone, roll back, delete,
bootstrap, clean up, and run commands in them."""

from __future__ import annotations

import contextlib
import grp
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autogentoo import API_VERSION
from autogentoo.daemon import inputs, runner
from autogentoo.daemon import roots as roots_mod
from autogentoo.daemon import uploads as uploads_mod
from autogentoo.daemon.api import router
from autogentoo.daemon.api.common import start_job
from autogentoo.daemon.config import Role
from autogentoo.daemon.jobs import JobContext, Lock
from autogentoo.daemon.routing import Ctx, doc_field, name_field
from autogentoo.daemon.service import DAEMON, Daemon
from autogentoo.errors import AgError, Code, Forbidden, InvalidArgument, NotFound
from autogentoo.names import check_file_name, check_name

V = f"/{API_VERSION}/roots"


def _daemon(ctx: Ctx) -> Daemon:
    return ctx.request.app[DAEMON]


@dataclass(frozen=True)
class CreateRoot:
    name: str = name_field("root name")
    upload: str | None = doc_field("id of an uploaded stage3 tarball", default=None)
    stage3: str | None = doc_field(
        "file name of a stage3 in the daemon's stage3 directory", default=None
    )
    digests: str | None = doc_field(
        "text of the Gentoo .DIGESTS or .sha256 file to check the tarball against", default=None
    )
    group: str | None = doc_field(
        "share the root with this group (builders in it may use it)", default=None
    )
    backend: str | None = doc_field(
        "storage backend: dir, or btrfs/zfs when configured (default: storage.backend)",
        default=None,
    )
    profile: str | None = doc_field(
        "a stage3 profile fetched with `agctl stage3 fetch` (amd64-openrc): its newest"
        " verified tarball; a 'stage3' that names no file but such a profile means the same",
        default=None,
    )


@router.route("GET", V, role=Role.VIEWER, summary="List roots", tag="roots")
async def list_roots(ctx: Ctx) -> list[dict[str, Any]]:
    return [r.json() for r in roots_mod.all_roots(_daemon(ctx))]


@router.route(
    "POST",
    V,
    role=Role.BUILDER,
    body=CreateRoot,
    tag="roots",
    summary="Create a root from a stage3 (an upload or the stage3 directory); a job",
)
async def create_root(ctx: Ctx) -> dict[str, Any]:
    d = _daemon(ctx)
    b: CreateRoot = ctx.body
    if sum(x is not None for x in (b.upload, b.stage3, b.profile)) != 1:
        raise InvalidArgument("give exactly one of 'upload', 'stage3' and 'profile'")
    profile = b.profile
    if (
        b.stage3 is not None
        and not (d.config.stage3_dir / check_file_name(b.stage3, "stage3 file name")).is_file()
        and inputs.newest_stage3(d, b.stage3) is not None
    ):
        profile = b.stage3
    group_gid = _share_with(ctx, b.group)
    if b.upload is not None:
        up = uploads_mod.get(d.state, d.config.uploads_dir, b.upload, ctx.caller)
        tarball, filename = up.path, up.filename
        source = {"upload": up.id, "filename": up.filename, "sha256": up.sha256}
    elif profile is not None:
        found = inputs.newest_stage3(d, inputs.check_profile(profile))
        if found is None:
            raise NotFound(
                f"there is no verified stage3 of profile {profile!r} in the cache;"
                f" `agctl stage3 fetch {profile}` first"
            )
        tarball, record = found
        filename = record["filename"]
        source = {"profile": profile, "stage3": filename, "digest": record["digest"]}
        up = None
    else:
        assert b.stage3 is not None
        filename = check_file_name(b.stage3, "stage3 file name")
        tarball = d.config.stage3_dir / filename
        if not tarball.is_file():
            raise NotFound(
                f"there is no stage3 {filename!r} in {d.config.stage3_dir}, nor a fetched"
                " stage3 profile of that name (`agctl stage3 list`)"
            )
        source = {"stage3": filename}
        up = None
    backend = str(d.storage.kind)
    if b.backend is not None:
        storage = d.storage_for(b.backend)
        await storage.probe()  # "not configured" now, not after the upload was read
        backend = str(storage.kind)
    roots_mod.reserve(d, b.name, ctx.caller, group_gid, source, backend)

    async def work(job: JobContext) -> None:
        await roots_mod.import_stage3(d, job, b.name, tarball, b.digests, filename)
        if up is not None:
            uploads_mod.delete(d.state, up)

    try:
        return start_job(
            ctx,
            "import",
            work=work,
            root=b.name,
            lock=Lock.EXCLUSIVE,
            params={"name": b.name, **source},
        )
    except BaseException:
        roots_mod.forget(d, b.name)
        raise


def _share_with(ctx: Ctx, group: str | None) -> int | None:
    """The gid to share a new root with; only a member of a group may share with it."""
    if group is None:
        return None
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise NotFound(f"there is no group {group!r}") from None
    if gid not in ctx.caller.gids and not ctx.caller.is_admin:
        raise Forbidden(f"you are not in group {group!r}, so you cannot share with it")
    return gid


@router.route("GET", V + "/{name}", role=Role.VIEWER, summary="Show a root", tag="roots")
async def show_root(ctx: Ctx) -> dict[str, Any]:
    d = _daemon(ctx)
    root = roots_mod.get(d, ctx.param("name", "root name"))
    out = root.json(d.storage_for(root.backend).path(root.name))
    if root.state == roots_mod.READY:
        out["snapshots"] = await d.storage_for(root.backend).snapshots(root.name)
    out["jobs"] = [j.id for j in d.jobs.running_on(root.name)]
    return out


def _writable(ctx: Ctx) -> tuple[Daemon, roots_mod.Root]:
    d = _daemon(ctx)
    root = roots_mod.get(d, ctx.param("name", "root name"))
    roots_mod.check_access(ctx.caller, root, write=True)
    roots_mod.usable(root)
    return d, root


@router.route(
    "DELETE",
    V + "/{name}",
    role=Role.BUILDER,
    summary="Delete a root and its snapshots; a job",
    tag="roots",
)
async def delete_root(ctx: Ctx) -> dict[str, Any]:
    d, root = _writable(ctx)

    async def work(job: JobContext) -> None:
        roots_mod.set_state(d, root.name, roots_mod.DELETING)
        removed = await roots_mod.unmount_all(d, root.name)
        for m in removed:
            job.log.line(f"unmounted {m}")
        await d.storage_for(root.backend).destroy(root.name)
        roots_mod.forget(d, root.name)
        job.log.line(f"root {root.name} deleted")

    return start_job(
        ctx, "delete", work=work, root=root.name, lock=Lock.EXCLUSIVE, params={"name": root.name}
    )


@dataclass(frozen=True)
class SnapshotBody:
    snapshot: str = name_field("snapshot name")


@router.route(
    "POST",
    V + "/{name}/snapshots",
    role=Role.BUILDER,
    body=SnapshotBody,
    summary="Take a read-only snapshot of a root; a job",
    tag="roots",
)
async def snapshot_root(ctx: Ctx) -> dict[str, Any]:
    d, root = _writable(ctx)
    snap = ctx.body.snapshot
    if snap in await d.storage_for(root.backend).snapshots(root.name):
        raise AgError(
            f"root {root.name!r} already has a snapshot {snap!r}", code=Code.ALREADY_EXISTS
        )

    async def work(job: JobContext) -> None:
        await d.storage_for(root.backend).snapshot(root.name, snap)
        job.log.line(f"snapshot {root.name}@{snap} taken")

    # Shared: a snapshot only reads the root, so packing may go on meanwhile,
    # while no writer can change it half-way through a copy.
    return start_job(
        ctx,
        "snapshot",
        work=work,
        root=root.name,
        lock=Lock.SHARED,
        params={"name": root.name, "snapshot": snap},
    )


@router.route(
    "DELETE",
    V + "/{name}/snapshots/{snapshot}",
    role=Role.BUILDER,
    summary="Delete a snapshot",
    tag="roots",
)
async def delete_snapshot(ctx: Ctx) -> dict[str, Any]:
    d, root = _writable(ctx)
    snap = ctx.param("snapshot", "snapshot name")
    await d.storage_for(root.backend).delete_snapshot(root.name, snap)
    return {"deleted": f"{root.name}@{snap}"}


@router.route(
    "POST",
    V + "/{name}/rollback",
    role=Role.BUILDER,
    body=SnapshotBody,
    summary="Make the root the content of one of its snapshots again; a job",
    tag="roots",
)
async def rollback_root(ctx: Ctx) -> dict[str, Any]:
    d, root = _writable(ctx)
    snap = ctx.body.snapshot
    if snap not in await d.storage_for(root.backend).snapshots(root.name):
        raise NotFound(f"root {root.name!r} has no snapshot {snap!r}")

    async def work(job: JobContext) -> None:
        await d.storage_for(root.backend).rollback(root.name, snap)
        job.log.line(f"root {root.name} rolled back to {snap}")

    return start_job(
        ctx,
        "rollback",
        work=work,
        root=root.name,
        lock=Lock.EXCLUSIVE,
        params={"name": root.name, "snapshot": snap},
    )


@dataclass(frozen=True)
class CloneBody:
    name: str = name_field("name of the new root")
    snapshot: str | None = doc_field(
        "clone this snapshot rather than the current state",
        default=None,
        check=lambda v: check_name(v, "snapshot name"),
    )
    group: str | None = doc_field("share the new root with this group", default=None)


@router.route(
    "POST",
    V + "/{name}/clone",
    role=Role.BUILDER,
    body=CloneBody,
    summary="Make a new root from this one (or one of its snapshots); a job",
    tag="roots",
)
async def clone_root(ctx: Ctx) -> dict[str, Any]:
    d = _daemon(ctx)
    src = roots_mod.get(d, ctx.param("name", "root name"))
    # Reading a root to clone it is allowed on any root one may write.
    roots_mod.check_access(ctx.caller, src, write=True)
    roots_mod.usable(src)
    b: CloneBody = ctx.body
    group_gid = src.group_gid if b.group is None else _share_with(ctx, b.group)
    # A clone lives where its source does (a zfs clone cannot leave its pool).
    roots_mod.reserve(
        d,
        b.name,
        ctx.caller,
        group_gid,
        {"clone_of": src.name, "snapshot": b.snapshot},
        src.backend,
    )

    async def work(job: JobContext) -> None:
        try:
            await d.storage_for(src.backend).clone(src.name, b.name, b.snapshot)
        except BaseException:
            await d.storage_for(src.backend).destroy(b.name)
            roots_mod.forget(d, b.name)
            raise
        roots_mod.set_state(d, b.name, roots_mod.READY)
        job.log.line(
            f"root {b.name} cloned from {src.name}" + (f"@{b.snapshot}" if b.snapshot else "")
        )

    try:
        return start_job(
            ctx,
            "clone",
            work=work,
            root=src.name,
            lock=Lock.SHARED if b.snapshot else Lock.EXCLUSIVE,
            params={"name": b.name, "source": src.name, "snapshot": b.snapshot},
        )
    except BaseException:
        roots_mod.forget(d, b.name)
        raise


@router.route(
    "POST",
    V + "/{name}/bootstrap",
    role=Role.BUILDER,
    tag="roots",
    summary="Prepare a root for work (dirs, make.conf, caches) and prove a job runs",
)
async def bootstrap_root(ctx: Ctx) -> dict[str, Any]:
    d, root = _writable(ctx)

    async def work(job: JobContext) -> None:
        await roots_mod.bootstrap(d, job, root)

    return start_job(
        ctx, "bootstrap", work=work, root=root.name, lock=Lock.EXCLUSIVE, params={"name": root.name}
    )


@router.route(
    "POST",
    V + "/{name}/cleanup",
    role=Role.BUILDER,
    tag="roots",
    summary="Stop the root's jobs and remove every mount under it, deepest first",
)
async def cleanup_root(ctx: Ctx) -> dict[str, Any]:
    d = _daemon(ctx)
    root = roots_mod.get(d, ctx.param("name", "root name"))
    roots_mod.check_access(ctx.caller, root, write=True)
    cancelled = []
    for job in d.jobs.running_on(root.name):
        d.jobs.cancel(job.id)
        cancelled.append(job.id)
    for job in list(d.jobs.live.values()):
        if job.id in cancelled and job.task is not None:
            await job.done.wait()
    removed = await roots_mod.unmount_all(d, root.name)
    return {"root": root.name, "cancelled_jobs": cancelled, "unmounted": removed}


@dataclass(frozen=True)
class RunBody:
    argv: list[str] | None = doc_field("command to run in the root (admin only)", default=None)
    recipe: str | None = doc_field(
        "name of a configured recipe (builders may run these)",
        default=None,
        check=lambda v: check_name(v, "recipe"),
    )
    script: str | None = doc_field(
        "a script's text, run with /bin/sh in the root (admin only)", default=None
    )
    script_upload: str | None = doc_field("id of an uploaded script (admin only)", default=None)
    env: dict[str, str] = doc_field("extra environment for the command", default={})


_ENV_NAME_OK = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_ENV_DENY = frozenset({"LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT"})


def _check_env(env: dict[str, str], admin: bool) -> dict[str, str]:
    for key, value in env.items():
        if not key or key[0].isdigit() or not set(key) <= _ENV_NAME_OK or len(key) > 128:
            raise InvalidArgument(f"{key[:60]!r} is not an environment variable name")
        if len(value) > 32768:
            raise InvalidArgument(f"the value of {key} is too long")
        if key in _ENV_DENY and not admin:
            raise Forbidden(f"setting {key} is for admins only")
    return env


@router.route(
    "POST",
    V + "/{name}/run",
    role=Role.BUILDER,
    body=RunBody,
    tag="roots",
    summary="Run a recipe (builder) or any command or script (admin) in the root; a job",
)
async def run_in_root(ctx: Ctx) -> dict[str, Any]:
    d, root = _writable(ctx)
    b: RunBody = ctx.body
    given = [x for x in (b.argv, b.recipe, b.script, b.script_upload) if x is not None]
    if len(given) != 1:
        raise InvalidArgument("give exactly one of 'argv', 'recipe', 'script', 'script_upload'")
    env = _check_env(b.env, ctx.caller.is_admin)
    sync = False
    script: bytes | None = None
    if b.recipe is not None:
        if b.recipe not in d.config.recipes:
            raise NotFound(
                f"there is no recipe {b.recipe!r} (configured: "
                f"{', '.join(sorted(d.config.recipes)) or 'none'})"
            )
        argv = list(d.config.recipes[b.recipe])
        sync = b.recipe == "sync"
        what = f"recipe {b.recipe}"
    else:
        # Anything but a named recipe is a root shell in all but name.
        if not ctx.caller.is_admin:
            raise Forbidden(
                "running arbitrary commands or scripts in a root is root-equivalent and"
                " needs the admin role; builders may run the configured recipes"
                f" ({', '.join(sorted(d.config.recipes))})",
                needed="admin",
            )
        if b.argv is not None:
            if not b.argv or not b.argv[0]:
                raise InvalidArgument("argv must name a command")
            argv = b.argv
            what = "command"
        else:
            if b.script is not None:
                script = b.script.encode()
            else:
                assert b.script_upload is not None
                up = uploads_mod.get(d.state, d.config.uploads_dir, b.script_upload, ctx.caller)
                if up.size > 16 << 20:
                    raise InvalidArgument("a script may be at most 16 MiB")
                script = up.path.read_bytes()
            argv = []
            what = "script"

    async def work(job: JobContext) -> None:
        nonlocal argv
        if script is not None:
            argv = ["/bin/sh", str(runner.script_path(job.id))]
            rc = await _run_script(d, job, root, script, argv, env)
        else:
            rc = await runner.run_in_root(d, job, root, argv, sync_repos=sync, env=env)
        if rc != 0:
            from autogentoo.daemon.run import describe_status

            raise AgError(f"the {what} {describe_status(rc)}", code=Code.JOB_FAILED, returncode=rc)

    return start_job(
        ctx,
        "run",
        work=work,
        root=root.name,
        lock=Lock.EXCLUSIVE,
        params={"name": root.name, "argv": argv, "recipe": b.recipe, "script": script is not None},
    )


async def _run_script(
    d: Daemon,
    job: JobContext,
    root: roots_mod.Root,
    script: bytes,
    argv: list[str],
    env: dict[str, str],
) -> int:
    """Write the script into the root (the Gentoo way: chroot ROOT /script.sh), run, remove."""
    from autogentoo.daemon import pathsafe

    rel = Path(str(runner.script_path(job.id)).lstrip("/"))
    with pathsafe.RootDir(d.storage_for(root.backend).path(root.name)) as rd:
        dir_fd = pathsafe.makedirs_in_root(rd.fd, str(rel.parent), 0o700)
    try:
        with pathsafe.RootDir(d.storage_for(root.backend).path(root.name)) as rd:
            pathsafe.write_file_in_root(rd.fd, str(rel), script, 0o700)
        return await runner.run_in_root(d, job, root, argv, env=env)
    finally:
        # By the directory fd opened safely above: the job may have replaced
        # the directory with a symlink meanwhile, and that must not matter.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rel.name, dir_fd=dir_fd)
        os.close(dir_fd)
