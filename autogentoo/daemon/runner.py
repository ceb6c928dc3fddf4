"""Running a command inside a root: the job spec, the shared caches, the output.

This is where a root's job gets its view of the world: which caches are
bound where, what make.conf says, which environment it sees. The namespace
and mount work itself is the sandbox's; this module only describes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from autogentoo.daemon import faults
from autogentoo.daemon.sandbox import Bind, ImageMount, JobSpec, job_env

if TYPE_CHECKING:
    from autogentoo.daemon.jobs import JobContext
    from autogentoo.daemon.roots import Root
    from autogentoo.daemon.service import Daemon


def _resolv_conf() -> bytes | None:
    try:
        with open("/etc/resolv.conf", "rb") as f:
            return f.read(64 * 1024)
    except OSError:
        return None


def cache_binds(daemon: Daemon, root: Root, *, sync_repos: bool) -> list[Bind]:
    """The shared caches, mounted (never copied) where Portage looks for them."""
    from autogentoo.daemon.roots import chost_of

    caches = daemon.config.caches
    chost = chost_of(daemon.storage_for(root.backend).path(root.name))
    binpkgs = caches.binpkgs / chost
    for d in (caches.distfiles, binpkgs, caches.repos):
        d.mkdir(parents=True, exist_ok=True, mode=0o755)
    return [
        Bind(str(caches.distfiles), "/var/cache/distfiles", readonly=False),
        Bind(str(binpkgs), "/var/cache/binpkgs", readonly=False),
        # Repositories are shared by every root; only a sync job writes them.
        Bind(str(caches.repos), "/var/db/repos", readonly=not sync_repos),
    ]


def repo_images(daemon: Daemon, *, sync_repos: bool) -> list[ImageMount]:
    """The repository snapshot in use (`agctl repo use`), over /var/db/repos/gentoo.

    A sync job gets the writable tree of caches.repos instead.
    """
    from autogentoo.daemon.inputs import active_repo_image

    image = None if sync_repos else active_repo_image(daemon)
    if image is None:
        return []
    # The mount point, made on the host: inside the job the bind is read-only.
    (daemon.config.caches.repos / "gentoo").mkdir(parents=True, exist_ok=True, mode=0o755)
    return [ImageMount(str(image), "/var/db/repos/gentoo")]


def job_spec(
    daemon: Daemon,
    root: Root,
    argv: list[str],
    *,
    sync_repos: bool = False,
    env: dict[str, str] | None = None,
    pty: bool = False,
) -> JobSpec:
    return JobSpec(
        root=str(daemon.storage_for(root.backend).path(root.name)),
        argv=tuple(argv),
        env=job_env(env, term="xterm" if pty else None),
        cwd="/",
        binds=tuple(cache_binds(daemon, root, sync_repos=sync_repos)),
        images=tuple(repo_images(daemon, sync_repos=sync_repos)),
        portage_tmpfs_size=daemon.config.jobs.portage_tmpfs_size,
        resolv_conf=_resolv_conf(),
        hostname=root.name,
        pty=pty,
    )


async def run_in_root(
    daemon: Daemon,
    ctx: JobContext,
    root: Root,
    argv: list[str],
    *,
    sync_repos: bool = False,
    env: dict[str, str] | None = None,
) -> int:
    """Run argv chrooted in root, its output going to the job log; returns the exit status.

    Cancelling the calling task kills the job's whole PID namespace.
    """
    spec = job_spec(daemon, root, argv, sync_repos=sync_repos, env=env)
    return await run_spec(daemon, ctx, spec)


async def run_spec(daemon: Daemon, ctx: JobContext, spec: JobSpec) -> int:
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        proc = await daemon.spawner.spawn(spec, stdin=devnull, stdout=wfd, stderr=wfd)
    except BaseException:
        os.close(rfd)
        raise
    finally:
        os.close(wfd)
        os.close(devnull)
    pump = asyncio.get_running_loop().create_task(_pump(rfd, ctx))
    try:
        await faults.point("job.spawned")
        rc = await proc.wait()
    except asyncio.CancelledError:
        await proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(proc.wait()), 10)
        raise
    finally:
        # The pipe reaches EOF once every process in the job is gone, which
        # PID-namespace teardown guarantees; don't wait forever regardless.
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(pump, 5)
        if not pump.done():
            pump.cancel()
    ctx.result["returncode"] = rc
    return int(rc)


async def _pump(fd: int, ctx: JobContext) -> None:
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    try:
        while True:
            await readable.wait()
            readable.clear()
            while True:
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if not data:
                    return
                ctx.log.write(data)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def script_path(job_id: int) -> Path:
    """Where an uploaded script is written inside the root for its job."""
    return Path(f"/var/tmp/autogentoo/job-{job_id}.sh")  # noqa: S108 - inside the chroot
