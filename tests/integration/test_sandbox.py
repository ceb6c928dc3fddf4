"""Jobs in their own namespaces, on a real busybox root, through the real spawner.

Everything here is real: namespaces, mounts, pivot_root, processes. The
root is a busybox stage3-shaped tree (no Gentoo stage3 can be downloaded
here); the code under test does not know the difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from autogentoo.daemon import mounts
from autogentoo.daemon.sandbox import INIT_NAME, Bind, JobSetupError, JobSpec
from autogentoo.daemon.spawner import JobProcess, Spawner, SpawnerDied
from tests.helpers.stage3 import build_tree

# Paths inside the job's root, not the host's temp directories.
PORTAGE_TMP = "/var/tmp/portage"  # noqa: S108
DEV_SHM = "/dev/shm"  # noqa: S108
VAR_TMP = "/var/tmp"  # noqa: S108

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and mounts"),
]


@dataclass(frozen=True)
class Tree:
    base: Path
    root: Path
    ro_src: Path
    rw_src: Path


@pytest.fixture(scope="module")
def tree() -> Iterator[Tree]:
    base = Path(tempfile.mkdtemp(prefix="ag-sandbox-"))
    try:
        root = build_tree(base / "root")
        ro_src, rw_src = base / "distfiles", base / "binpkgs"
        ro_src.mkdir()
        rw_src.mkdir()
        (ro_src / "hello.tar.gz").write_text("distfile\n")
        yield Tree(base, root, ro_src, rw_src)
    finally:
        # Nothing may be mounted here: fail loudly rather than delete through a mount.
        left = mounts.mounts_under(str(base), include_root=True)
        shutil.rmtree(base) if not left else None
        assert not left, f"mounts left behind: {[m.mount_point for m in left]}"


@pytest.fixture
async def spawner() -> AsyncIterator[Spawner]:
    sp = Spawner()
    await sp.start()
    try:
        yield sp
    finally:
        await sp.stop()


def spec_for(tree: Tree, *argv: str, **kw: object) -> JobSpec:
    base = JobSpec(
        root=str(tree.root),
        argv=argv,
        binds=(
            Bind(str(tree.ro_src), "/var/cache/distfiles", True),
            Bind(str(tree.rw_src), "/var/cache/binpkgs", False),
        ),
        portage_tmpfs_size="64m",
        resolv_conf=b"nameserver 192.0.2.53\n",
        hostname="agtest",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Done:
    rc: int
    out: str
    err: str


async def _drain(fd: int) -> bytes:
    def read_all() -> bytes:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.to_thread(read_all)
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def started(
    sp: Spawner, spec: JobSpec
) -> AsyncIterator[tuple[JobProcess, asyncio.Task[bytes], asyncio.Task[bytes]]]:
    """A running job with its stdout/stderr being read; killed if the test leaves early."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        proc = await sp.spawn(spec, null, out_w, err_w)
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (null, out_w, err_w):
            os.close(fd)
    out = asyncio.create_task(_drain(out_r))
    err = asyncio.create_task(_drain(err_r))
    try:
        yield proc, out, err
    finally:
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                await proc.kill(signal.SIGKILL)
                await proc.wait()
        await asyncio.gather(out, err, return_exceptions=True)


async def run(sp: Spawner, spec: JobSpec) -> Done:
    async with started(sp, spec) as (proc, out, err):
        rc = await proc.wait()
        return Done(rc, (await out).decode(), (await err).decode())


def sh(tree: Tree, script: str, **kw: object) -> JobSpec:
    return spec_for(tree, "/bin/sh", "-c", script, **kw)


def host_mounts_mentioning(*paths: Path) -> list[str]:
    """Host mountinfo lines whose mount point or source root is under one of paths."""
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    return [ln for ln in lines if any(str(p) in ln for p in paths)]


def processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


async def until_gone(marker: str) -> list[int]:
    """Processes with marker, polled for a while: the kernel kills a namespace asynchronously."""
    for _ in range(200):
        left = processes_with(marker)
        if not left:
            return []
        await asyncio.sleep(0.05)
    return processes_with(marker)


# --- what the job sees ---------------------------------------------------------


async def test_mounts_seen_from_inside(spawner: Spawner, tree: Tree) -> None:
    done = await run(spawner, sh(tree, "cat /proc/self/mountinfo"))
    assert done.rc == 0, done.err
    info = {m.mount_point: m for m in mounts.parse_mountinfo_text(done.out)}
    pts = info["/dev/pts"]
    assert pts.fstype == "devpts"
    assert {"gid=5", "mode=620", "ptmxmode=666"} <= set(pts.super_options)
    portage = info[PORTAGE_TMP]
    assert portage.fstype == "tmpfs"
    assert {"size=65536k", "mode=775", "uid=250", "gid=250"} <= set(portage.super_options)
    assert info["/proc"].fstype == "proc"
    assert "ro" in info["/sys"].options
    assert info["/dev"].fstype == "tmpfs" and "nosuid" in info["/dev"].options
    assert "ro" in info["/var/cache/distfiles"].options
    assert "rw" in info["/var/cache/binpkgs"].options
    assert "ro" in info["/etc/resolv.conf"].options
    # pivot_root dropped the host's mounts: only the job's are left.
    assert set(info) == {
        "/",
        "/proc",
        "/sys",
        "/dev",
        "/dev/pts",
        DEV_SHM,
        PORTAGE_TMP,
        "/var/cache/distfiles",
        "/var/cache/binpkgs",
        "/etc/resolv.conf",
    }


async def test_dev_is_minimal(spawner: Spawner, tree: Tree) -> None:
    done = await run(
        spawner, sh(tree, "ls /dev; echo x > /dev/null; head -c 4 /dev/urandom | wc -c")
    )
    assert done.rc == 0, done.err
    lines = done.out.split()
    assert set(lines[:-1]) == {
        "core",
        "fd",
        "full",
        "null",
        "ptmx",
        "pts",
        "random",
        "shm",
        "stderr",
        "stdin",
        "stdout",
        "tty",
        "urandom",
        "zero",
    }
    assert lines[-1] == "4"


async def test_binds_read_only_where_asked(spawner: Spawner, tree: Tree) -> None:
    done = await run(
        spawner,
        sh(
            tree,
            (
                "cat /var/cache/distfiles/hello.tar.gz;"
                "echo no > /var/cache/distfiles/new || echo EROFS-distfiles;"
                "echo pkg > /var/cache/binpkgs/made-in-job;"
                "echo no > /etc/resolv.conf || echo EROFS-resolv;"
                "cat /etc/resolv.conf"
            ),
        ),
    )
    assert done.rc == 0, done.err
    assert "distfile" in done.out
    assert "EROFS-distfiles" in done.out and "Read-only file system" in done.err
    assert "EROFS-resolv" in done.out and "nameserver 192.0.2.53" in done.out
    assert not (tree.ro_src / "new").exists()
    assert (tree.rw_src / "made-in-job").read_text() == "pkg\n"
    (tree.rw_src / "made-in-job").unlink()
    # resolv.conf was shown to the job, not written into the root.
    assert (tree.root / "etc/resolv.conf").read_bytes() == b""


async def test_pid1_is_our_init_and_only_job_processes(spawner: Spawner, tree: Tree) -> None:
    done = await run(spawner, sh(tree, "cat /proc/1/comm; echo $$; ps -o pid,comm; hostname"))
    assert done.rc == 0, done.err
    lines = done.out.splitlines()
    assert lines[0] == INIT_NAME
    assert lines[1] == "2"  # the work is the first process after PID 1
    table = [ln.split() for ln in lines[3:-1]]
    # Only the job's own processes: PID 1, the shell, and ps itself.
    assert sorted(comm for _, comm in table) == sorted([INIT_NAME, "sh", "ps"])
    assert ["1", INIT_NAME] in table and ["2", "sh"] in table
    assert lines[-1] == "agtest"


async def test_env_cwd_and_identity(spawner: Spawner, tree: Tree) -> None:
    spec = sh(tree, "pwd; echo $FOO; id -u", cwd=VAR_TMP, env={"PATH": "/bin", "FOO": "bar"})
    done = await run(spawner, spec)
    assert done.out.split() == [VAR_TMP, "bar", "0"]
    done = await run(spawner, replace(spec, uid=250, gid=250))
    assert done.out.split() == [VAR_TMP, "bar", "250"]


async def test_pty_is_controlling_terminal(spawner: Spawner, tree: Tree) -> None:
    master, slave = pty.openpty()
    try:
        proc = await spawner.spawn(
            sh(tree, "[ -t 0 ] && echo is-a-tty; cat /proc/self/stat", pty=True),
            slave,
            slave,
            slave,
        )
        os.close(slave)
        slave = -1
        rc = await proc.wait()
        out = b""
        with contextlib.suppress(OSError):  # EIO once the slave side is gone
            while chunk := os.read(master, 65536):
                out += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert rc == 0
    text = out.decode()
    assert "is-a-tty" in text
    stat = text.split("is-a-tty", 1)[1].split(")")[-1].split()
    # fields after comm: state ppid pgrp session tty_nr: the work leads a session with a ctty
    assert stat[4] != "0"


# --- exit codes, signals, errors ------------------------------------------------


async def test_exit_codes_and_signals(spawner: Spawner, tree: Tree) -> None:
    assert (await run(spawner, sh(tree, "exit 7"))).rc == 7
    assert (await run(spawner, spec_for(tree, "true"))).rc == 0
    assert (await run(spawner, spec_for(tree, "false"))).rc == 1
    assert (await run(spawner, sh(tree, "kill -USR1 $$"))).rc == -signal.SIGUSR1


async def test_missing_command_is_a_message(spawner: Spawner, tree: Tree) -> None:
    with pytest.raises(JobSetupError, match=r"cannot execute 'no-such-tool'.*No such file"):
        await run(spawner, spec_for(tree, "no-such-tool"))


async def test_root_without_sh_is_a_message(spawner: Spawner, tree: Tree) -> None:
    bare = tree.base / "bare"
    for d in ("proc", "sys", "dev", "etc"):
        (bare / d).mkdir(parents=True, exist_ok=True)
    try:
        with pytest.raises(JobSetupError, match=r"cannot execute '/bin/sh'"):
            await run(spawner, JobSpec(root=str(bare), argv=("/bin/sh", "-c", "true")))
    finally:
        shutil.rmtree(bare)


async def test_bad_bind_source_is_a_message(spawner: Spawner, tree: Tree) -> None:
    spec = sh(tree, "true", binds=(Bind(str(tree.base / "nowhere"), "/mnt/x", True),))
    with pytest.raises(JobSetupError, match=r"cannot mount /mnt/x.*nowhere"):
        await run(spawner, spec)
    assert not host_mounts_mentioning(tree.root)


async def test_missing_cwd_is_a_message(spawner: Spawner, tree: Tree) -> None:
    with pytest.raises(JobSetupError, match="cannot change to /no/such/dir"):
        await run(spawner, sh(tree, "true", cwd="/no/such/dir"))


async def test_symlinked_bind_target_stays_in_root(spawner: Spawner, tree: Tree) -> None:
    # ROOT/mnt -> an absolute path that exists on the host AND inside the root:
    # inside the root it must mean ROOT/<that path>, never the host's.
    outside = tree.base / "outside"
    outside.mkdir()
    inside = tree.root / str(outside).lstrip("/")
    inside.mkdir(parents=True)
    link = tree.root / "mnt"
    link.symlink_to(outside)
    try:
        spec = sh(tree, "ls /mnt/escape", binds=(Bind(str(tree.ro_src), "/mnt/escape", True),))
        done = await run(spawner, spec)
        assert done.out == "hello.tar.gz\n"
        assert not (outside / "escape").exists()
        assert (inside / "escape").is_dir()
        # A dangling link is refused with a message, never followed out.
        shutil.rmtree(inside)
        with pytest.raises(JobSetupError, match="cannot mount /mnt/escape"):
            await run(spawner, spec)
        assert not (outside / "escape").exists()
    finally:
        link.unlink()
        shutil.rmtree(outside)
        shutil.rmtree(tree.root / str(tree.base).lstrip("/"), ignore_errors=True)


# --- nothing outlives a job, nothing leaks to the host ---------------------------


async def test_host_mountinfo_unchanged_during_and_after(spawner: Spawner, tree: Tree) -> None:
    before = host_mounts_mentioning(tree.root, tree.ro_src, tree.rw_src)
    async with started(spawner, sh(tree, "sleep 987649")) as (proc, _out, _err):
        # The job is up (it has exec'd): its mounts exist in its namespace only.
        with open(f"/proc/{proc.pid}/mountinfo") as f:
            inside = f.read()
        assert PORTAGE_TMP in inside
        assert host_mounts_mentioning(tree.root, tree.ro_src, tree.rw_src) == before
        await proc.kill(signal.SIGTERM)
        assert await proc.wait() == -signal.SIGTERM
    assert host_mounts_mentioning(tree.root, tree.ro_src, tree.rw_src) == before == []


async def test_background_process_does_not_outlive_job(spawner: Spawner, tree: Tree) -> None:
    done = await run(spawner, sh(tree, "sleep 987651 & echo started; exit 3"))
    assert done.rc == 3 and "started" in done.out
    # PID 1 exited with the work, so the kernel killed the namespace before we heard of it.
    assert processes_with("987651") == []


async def test_cancel_kills_everything(spawner: Spawner, tree: Tree) -> None:
    async with started(spawner, sh(tree, "sleep 987652 & sleep 987652; echo never")) as (
        proc,
        out,
        _,
    ):
        while len(processes_with("987652")) < 3:  # sh -c (its cmdline) and two sleeps
            await asyncio.sleep(0.01)
        await proc.kill()
        assert await proc.wait() == -signal.SIGTERM
        assert "never" not in (await out).decode()
    assert processes_with("987652") == []


async def test_cancel_during_setup_is_not_lost(spawner: Spawner, tree: Tree) -> None:
    # kill before spawn() returns: send it from another task as soon as the id exists.
    spec = spec_for(tree, "sleep", "987653")
    task = asyncio.create_task(run(spawner, spec))
    while not processes_with("987653"):
        await asyncio.sleep(0.005)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert await until_gone("987653") == []


async def test_many_spawn_kill_cycles_leave_nothing(spawner: Spawner, tree: Tree) -> None:
    for i in range(200):
        async with started(spawner, spec_for(tree, "sleep", "987654")) as (proc, _o, _e):
            await proc.kill(signal.SIGKILL if i % 2 else signal.SIGTERM)
            rc = await proc.wait()
            assert rc in (-signal.SIGKILL, -signal.SIGTERM)
    assert processes_with("987654") == []
    assert host_mounts_mentioning(tree.root) == []


async def test_concurrent_jobs(spawner: Spawner, tree: Tree) -> None:
    results = await asyncio.gather(
        *(run(spawner, sh(tree, f"echo job{i}; exit {i}")) for i in range(12))
    )
    for i, done in enumerate(results):
        assert done.rc == i and done.out == f"job{i}\n"


async def test_spawner_killed_mid_job_kills_the_job(spawner: Spawner, tree: Tree) -> None:
    async with started(spawner, spec_for(tree, "sleep", "987650")) as (proc, _o, _e):
        assert spawner.pid is not None
        os.kill(spawner.pid, signal.SIGKILL)
        with pytest.raises(SpawnerDied):
            await proc.wait()
    assert await until_gone("987650") == []
    assert host_mounts_mentioning(tree.root) == []
    # The next spawn starts a new spawner.
    assert (await run(spawner, spec_for(tree, "true"))).rc == 0


def test_spec_round_trips_json(tree: Tree) -> None:
    spec = spec_for(tree, "echo", "hi", pty=True, uid=5)
    assert JobSpec.from_json(spec.to_json()) == spec
