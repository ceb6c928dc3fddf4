"""A throwaway ZFS pool for tests, through zfs-fuse on a sparse file.

zfs-fuse serves one control socket per machine, so test processes share a
single zfs-fuse: the first one starts it (recording its pid and start time
in PIDFILE), each holds a shared flock on PIDFILE while it uses it, and the
last one out stops it (SIGTERM, wait, SIGKILL). A zfs-fuse this machinery did
not start (a system service) is used but never stopped.

Each user makes its own pool, `agtest-<pid>-<random>`, with cachefile=none so
no zfs-fuse ever imports it again. Pools and a zfs-fuse left by a crashed run
(their pid gone, nobody holding the lock) are cleaned up on the next start.
zfs-fuse runs in its own session so an interrupted test cannot kill it with
its FUSE mounts still up (they would stay behind as dead mounts).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from autogentoo.daemon.run import run_sync
from autogentoo.daemon.storage.base import mounts_below

SIZE = 512 << 20
POOL_PREFIX = "agtest-"
STATE = Path("/run/lock")
MUTEX = STATE / "autogentoo-tests-zfs-fuse.lock"  # serialises start/stop decisions
PIDFILE = STATE / "autogentoo-tests-zfs-fuse.pid"  # "pid starttime"; flock SH = in use
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def zfs_usable() -> str | None:
    """Why zfs tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    if not Path("/dev/fuse").exists():
        return "/dev/fuse is missing"
    for tool in ("zfs-fuse", "zpool", "zfs"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install zfs-fuse)"
    return None


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if fields[0] == "Z":
        return None  # a zombie is as good as gone
    return fields[19]  # field 22 of stat: start time, tells a reused pid apart


def _zfs_fuse_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == "zfs-fuse":
                    pids.append(int(entry))
    return pids


def _recorded() -> tuple[int, str] | None:
    """The zfs-fuse a test fixture started, if it is still that process."""
    try:
        pid_s, start = PIDFILE.read_text().split()
    except (OSError, ValueError):
        return None
    pid = int(pid_s)
    return (pid, start) if _start_time(pid) == start else None


def _ready() -> bool:
    return run_sync(["zpool", "list", "-H"], check=False).returncode == 0


def _wait_ready(proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if _ready():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"zfs-fuse exited with status {proc.returncode} at start")
        time.sleep(0.1)
    raise RuntimeError(f"zfs-fuse not ready after {READY_TIMEOUT:.0f}s")


def _stop(pid: int, child: subprocess.Popen[bytes] | None = None) -> None:
    start = _start_time(pid)
    if start is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            return
        if _start_time(pid) != start:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if child is not None:
        child.wait()


def _pool_owner_alive(pool: str) -> bool:
    pid = pool.removeprefix(POOL_PREFIX).partition("-")[0]
    return pid.isdigit() and _start_time(int(pid)) is not None


def _destroy_pool(pool: str) -> None:
    # A pool can be "busy" for a moment after its datasets were last used.
    for _ in range(20):
        if run_sync(["zpool", "destroy", "-f", pool], check=False).returncode == 0:
            break
        if pool not in _pools():
            break
        time.sleep(0.25)
    _remove_dir(Path(tempfile.gettempdir()) / pool)


def destroy_dataset(dataset: str) -> None:
    """Destroy a test's dataset with everything under and cloned from it.

    `-R` is fine here and only here: the dataset belongs to one test. The
    retries cover zfs-fuse reporting "busy" for a moment after any access.
    """
    for _ in range(40):
        res = run_sync(["zfs", "destroy", "-r", "-R", dataset], check=False)
        if res.returncode == 0 or b"does not exist" in res.stderr:
            return
        time.sleep(0.25)
    raise RuntimeError(f"cannot destroy {dataset}: {res.stderr.decode(errors='replace')}")


def _pools() -> list[str]:
    res = run_sync(["zpool", "list", "-H", "-o", "name"], check=False)
    return res.text.split() if res.returncode == 0 else []


def _remove_dir(top: Path) -> None:
    if top.exists() and not os.path.ismount(top) and not mounts_below(top):
        shutil.rmtree(top, ignore_errors=True)


def _clean_stale_pools() -> None:
    for pool in _pools():
        if pool.startswith(POOL_PREFIX) and not _pool_owner_alive(pool):
            _destroy_pool(pool)


@contextlib.contextmanager
def _locked(path: Path, how: int) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, how)
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def zfs_test_pool(size: int = SIZE) -> Iterator[tuple[str, Path]]:
    """Yield (pool name, mountpoint) of a fresh pool; undo everything after."""
    pool = f"{POOL_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    top = Path(tempfile.gettempdir()) / pool
    child: subprocess.Popen[bytes] | None = None
    use_fd: int | None = None
    created = False
    try:
        with _locked(MUTEX, fcntl.LOCK_EX):
            _clean_stale_pools()
            if not _zfs_fuse_pids():
                top.mkdir(mode=0o700)
                with open(top / "zfs-fuse.log", "wb") as log:
                    child = subprocess.Popen(
                        ["zfs-fuse", "--no-daemon", "--no-kstat-mount"],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        start_new_session=True,
                    )
                start = _start_time(child.pid)
                PIDFILE.write_text(f"{child.pid} {start}\n")
                _wait_ready(child)
            use_fd = os.open(PIDFILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(use_fd, fcntl.LOCK_SH)
        top.mkdir(mode=0o700, exist_ok=True)
        image, mnt = top / "pool.img", top / "mnt"
        with open(image, "wb") as f:
            f.truncate(size)
        run_sync(["zpool", "create", "-o", "cachefile=none", "-m", str(mnt), pool, str(image)])
        created = True
        yield pool, mnt
    finally:
        if created or pool in _pools():
            _destroy_pool(pool)
        with _locked(MUTEX, fcntl.LOCK_EX):
            if use_fd is not None:
                os.close(use_fd)  # drops our shared lock
            _stop_if_unused(child)
        _remove_dir(top)


def _stop_if_unused(child: subprocess.Popen[bytes] | None) -> None:
    """Stop the fixture-started zfs-fuse if no test process holds it (caller has MUTEX)."""
    recorded = _recorded()
    if recorded is None:
        if child is not None:  # ours, but never recorded: failed at start
            _stop(child.pid, child)
        return
    fd = os.open(PIDFILE, os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another test process still uses it
        _clean_stale_pools()
        if _pools():
            return  # someone's pools (not ours): leave zfs-fuse to them
        pid = recorded[0]
        _stop(pid, child if child is not None and child.pid == pid else None)
        PIDFILE.unlink(missing_ok=True)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def zfs_pool() -> Iterator[tuple[str, Path]]:
    reason = zfs_usable()
    if reason:
        pytest.skip(f"zfs: {reason}")
    with zfs_test_pool() as pool:
        yield pool
