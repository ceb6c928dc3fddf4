"""One suite for every storage backend: dir, btrfs (loop-mounted), zfs (zfs-fuse).

Everything here is real: real subvolumes on a loop device, a real zfs-fuse
pool on a sparse file. zfs-fuse does not support extended attributes, so on
zfs the xattr/capability checks are skipped (ZFS on Linux keeps them).
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import shutil
import stat
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from autogentoo.daemon.config import Backend, Config, StorageConfig
from autogentoo.daemon.run import run_sync
from autogentoo.daemon.storage import (
    BtrfsStorage,
    DirStorage,
    Storage,
    ZfsStorage,
    make_storage,
)
from autogentoo.daemon.storage.base import SNAPSHOT_DIR, mounts_below
from autogentoo.daemon.storage.btrfs import _subvolumes_below
from autogentoo.errors import (
    AlreadyExists,
    BackendUnavailable,
    Conflict,
    InvalidName,
    MountBusy,
    NoSpace,
    NotFound,
)
from tests.helpers.btrfs import btrfs_filesystem, btrfs_usable
from tests.helpers.zfs import destroy_dataset, zfs_test_pool, zfs_usable

pytestmark = pytest.mark.integration

BACKENDS = ["dir", "btrfs", "zfs"]
_counter = itertools.count()


@dataclass
class Env:
    storage: Storage
    kind: str
    xattrs: bool

    def leftovers(self) -> list[str]:
        """Anything the backend still holds besides what a test left on purpose."""
        s = self.storage
        if isinstance(s, ZfsStorage):
            res = run_sync(["zfs", "list", "-H", "-o", "name", "-t", "all", "-r", s.dataset])
            return [n for n in res.text.split() if n != s.dataset]
        assert isinstance(s, DirStorage | BtrfsStorage)
        found = [e for e in os.listdir(s.base) if e != SNAPSHOT_DIR]
        snapdir = s.base / SNAPSHOT_DIR
        if snapdir.exists():
            found += [f"{SNAPSHOT_DIR}/{e}" for e in os.listdir(snapdir)]
        return found


def _xattrs_supported(path: Path) -> bool:
    probe = path / ".xattr-probe"
    probe.write_text("")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            return False
        raise
    finally:
        probe.unlink()


@dataclass(frozen=True)
class Backing:
    """What a backend's roots live on: nothing, a btrfs mount, or a zfs pool."""

    kind: str
    mount: Path | None = None
    pool: str | None = None


@pytest.fixture(scope="module", params=BACKENDS)
def backing(request: pytest.FixtureRequest) -> Iterator[Backing]:
    # Module-scoped and requested statically, so the filesystem exists before
    # the suite's per-test leak check takes its "before" picture.
    kind: str = request.param
    if kind == "dir":
        yield Backing(kind)
    elif kind == "btrfs":
        reason = btrfs_usable()
        if reason:
            pytest.skip(f"btrfs: {reason}")
        with btrfs_filesystem() as mnt:
            yield Backing(kind, mount=mnt)
    else:
        reason = zfs_usable()
        if reason:
            pytest.skip(f"zfs: {reason}")
        with zfs_test_pool() as (pool, mnt):
            yield Backing(kind, mount=mnt, pool=pool)


@pytest.fixture
async def env(backing: Backing) -> AsyncIterator[Env]:
    kind = backing.kind
    n = next(_counter)
    storage: Storage
    scratch: Path | None = None
    if kind == "dir":
        scratch = Path(tempfile.mkdtemp(prefix="agtest-dir-"))
        storage = DirStorage(scratch / "roots")
        base = scratch
    elif kind == "btrfs":
        assert backing.mount is not None
        base = backing.mount / f"t{n}"
        base.mkdir()
        storage = BtrfsStorage(base)
    else:
        assert backing.mount is not None and backing.pool is not None
        dataset = f"{backing.pool}/t{n}"
        run_sync(["zfs", "create", dataset])
        storage = ZfsStorage(dataset)
        base = backing.mount / f"t{n}"
    try:
        await storage.probe()
        yield Env(storage, kind, _xattrs_supported(base))
    finally:
        for m in mounts_below(base):
            if kind != "zfs" or m.fstype != "fuse.zfs":
                run_sync(["umount", "-l", str(m.mountpoint)], check=False)
        if kind == "zfs":
            assert isinstance(storage, ZfsStorage)
            destroy_dataset(storage.dataset)
        elif kind == "btrfs":
            for sub in _subvolumes_below(base):
                run_sync(["btrfs", "subvolume", "delete", str(sub)], check=False)
            shutil.rmtree(base, ignore_errors=True)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


# --- a stage3-ish tree and a way to compare trees -----------------------------

# VFS_CAP_REVISION_2 with the effective bit, CAP_NET_RAW (13) permitted.
CAP_NET_RAW_XATTR = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)


def populate(root: Path, xattrs: bool) -> None:
    for d in ("etc", "usr/bin", "usr/lib", "var/empty", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "etc/hostname").write_text("stage3\n")
    su = root / "usr/bin/su"
    su.write_bytes(b"\x7fELF fake su" * 100)
    os.chown(su, 0, 0)
    su.chmod(0o4755)
    os.link(su, root / "usr/bin/su-hardlink")
    (root / "bin").symlink_to("usr/bin")
    (root / "usr/lib/abs-link").symlink_to("/etc/hostname")
    portage = root / "var/empty/owned"
    portage.write_text("numeric owner\n")
    os.chown(portage, 250, 250)
    os.mkfifo(root / "var/empty/fifo")
    if xattrs:
        ping = root / "usr/bin/ping"
        ping.write_bytes(b"fake ping")
        ping.chmod(0o755)
        os.setxattr(ping, "security.capability", CAP_NET_RAW_XATTR)
        os.setxattr(root / "etc/hostname", "user.note", b"kept")


def manifest(root: Path) -> dict[str, Any]:
    """Everything about a tree that a snapshot must keep."""
    entries: dict[str, Any] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, *([] if dirpath != str(root) else ["."])]:
            p = Path(dirpath) / name if name != "." else root
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            content: str | None = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(p.read_bytes()).hexdigest()
                inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            try:
                xa = {
                    k: os.getxattr(p, k, follow_symlinks=False)
                    for k in sorted(os.listxattr(p, follow_symlinks=False))
                }
            except OSError:
                xa = {}
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
            entries[rel] = (st.st_mode, st.st_uid, st.st_gid, content, xa, mtime)
    links = sorted(sorted(v) for v in inodes.values() if len(v) > 1)
    return {"entries": entries, "hardlinks": links}


def check_tree(root: Path, xattrs: bool) -> None:
    """Spot checks that a copy kept what a chroot needs."""
    su = root / "usr/bin/su"
    st = os.lstat(su)
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert st.st_mode & stat.S_ISUID
    assert os.lstat(root / "usr/bin/su-hardlink").st_ino == st.st_ino
    assert os.readlink(root / "bin") == "usr/bin"
    assert os.lstat(root / "var/empty/owned").st_uid == 250
    assert stat.S_ISFIFO(os.lstat(root / "var/empty/fifo").st_mode)
    if xattrs:
        assert os.getxattr(root / "usr/bin/ping", "security.capability") == CAP_NET_RAW_XATTR
        assert os.getxattr(root / "etc/hostname", "user.note") == b"kept"


def modify(root: Path) -> None:
    (root / "etc/hostname").write_text("changed\n")
    (root / "usr/bin/su").unlink()
    (root / "new-file").write_text("new\n")
    (root / "bin").unlink()


# --- the suite ----------------------------------------------------------------


async def test_create_path_exists(env: Env) -> None:
    s = env.storage
    assert not await s.exists("r1")
    path = await s.create("r1")
    assert path == s.path("r1")
    assert path.is_dir() and os.listdir(path) == []
    assert await s.exists("r1")
    assert await s.snapshots("r1") == []
    await s.destroy("r1")
    assert not await s.exists("r1")
    assert env.leftovers() == []


async def test_snapshot_modify_rollback(env: Env) -> None:
    s = env.storage
    root = await s.create("r1")
    populate(root, env.xattrs)
    before = manifest(root)
    check_tree(root, env.xattrs)
    await s.snapshot("r1", "s1")
    modify(root)
    assert manifest(root) != before
    await s.rollback("r1", "s1")
    assert s.path("r1") == root
    assert manifest(root) == before
    check_tree(root, env.xattrs)
    assert "s1" in await s.snapshots("r1")
    # the snapshot survives and can be used again
    modify(root)
    await s.rollback("r1", "s1")
    assert manifest(root) == before


async def test_clone_is_independent(env: Env) -> None:
    s = env.storage
    root = await s.create("src")
    populate(root, env.xattrs)
    at_snapshot = manifest(root)
    await s.snapshot("src", "s1")
    (root / "after-snapshot").write_text("x\n")
    now = manifest(root)

    from_now = await s.clone("src", "c-now")
    from_snap = await s.clone("src", "c-snap", "s1")
    assert from_now == s.path("c-now") and from_snap == s.path("c-snap")
    assert manifest(from_now) == now
    assert manifest(from_snap) == at_snapshot
    check_tree(from_now, env.xattrs)
    check_tree(from_snap, env.xattrs)
    assert await s.snapshots("c-now") == []

    modify(from_now)
    assert manifest(root) == now
    modify(root)
    assert manifest(from_snap) == at_snapshot
    assert (from_now / "after-snapshot").exists()


async def test_snapshots_listed_and_deleted(env: Env) -> None:
    s = env.storage
    await s.create("r1")
    await s.create("r2")
    for snap in ("b", "a", "c"):
        await s.snapshot("r1", snap)
    await s.snapshot("r2", "other")
    assert await s.snapshots("r1") == ["a", "b", "c"]
    assert await s.snapshots("r2") == ["other"]
    await s.delete_snapshot("r1", "b")
    assert await s.snapshots("r1") == ["a", "c"]


async def test_destroy_removes_snapshots(env: Env) -> None:
    s = env.storage
    root = await s.create("r1")
    populate(root, env.xattrs)
    await s.snapshot("r1", "s1")
    await s.snapshot("r1", "s2")
    await s.destroy("r1")
    assert not await s.exists("r1")
    assert not root.exists()
    assert env.leftovers() == []
    await s.destroy("r1")  # idempotent
    with pytest.raises(NotFound):
        await s.snapshots("r1")
    # the name is free again, with no old snapshots attached
    await s.create("r1")
    assert await s.snapshots("r1") == []


async def test_destroying_a_source_keeps_its_clones(env: Env) -> None:
    s = env.storage
    root = await s.create("base")
    populate(root, env.xattrs)
    await s.snapshot("base", "s1")
    at_s1 = manifest(root)
    (root / "later").write_text("later\n")
    await s.snapshot("base", "s2")
    now = manifest(root)
    b = await s.clone("base", "b")
    c = await s.clone("base", "c", "s1")
    await s.snapshot("b", "s1")  # same name as the source's: must not collide

    await s.destroy("base")
    assert not await s.exists("base")
    assert manifest(b) == now
    assert manifest(c) == at_s1
    assert await s.snapshots("b") == ["s1"]
    assert await s.snapshots("c") == []
    # the survivors still work fully
    await s.rollback("b", "s1")
    assert manifest(b) == now
    d = await s.clone("c", "d")
    assert manifest(d) == at_s1

    for name in ("b", "c", "d"):
        await s.destroy(name)
    assert env.leftovers() == []


async def test_deleting_a_snapshot_a_clone_came_from(env: Env) -> None:
    s = env.storage
    root = await s.create("a")
    populate(root, env.xattrs)
    await s.snapshot("a", "s1")
    c = await s.clone("a", "c", "s1")
    expected = manifest(c)
    await s.delete_snapshot("a", "s1")
    assert await s.snapshots("a") == []
    assert manifest(c) == expected
    await s.snapshot("a", "s1")  # the name is reusable
    await s.destroy("c")
    await s.destroy("a")
    assert env.leftovers() == []


async def test_rollback_past_a_clone(env: Env) -> None:
    s = env.storage
    root = await s.create("a")
    (root / "f").write_text("1\n")
    await s.snapshot("a", "s1")
    (root / "f").write_text("2\n")
    await s.clone("a", "b")
    if env.kind == "zfs":
        # zfs rollback would have to destroy b's origin: refused, documented
        with pytest.raises(Conflict):
            await s.rollback("a", "s1")
        assert (root / "f").read_text() == "2\n"
    else:
        await s.rollback("a", "s1")
        assert (root / "f").read_text() == "1\n"
    assert (s.path("b") / "f").read_text() == "2\n"


async def test_errors(env: Env) -> None:
    s = env.storage
    with pytest.raises(NotFound):
        await s.snapshot("missing", "s1")
    with pytest.raises(NotFound):
        await s.snapshots("missing")
    with pytest.raises(NotFound):
        await s.rollback("missing", "s1")
    with pytest.raises(NotFound):
        await s.clone("missing", "new")
    with pytest.raises(NotFound):
        await s.usage("missing")
    await s.create("r1")
    with pytest.raises(AlreadyExists):
        await s.create("r1")
    with pytest.raises(NotFound):
        await s.rollback("r1", "nope")
    with pytest.raises(NotFound):
        await s.delete_snapshot("r1", "nope")
    with pytest.raises(NotFound):
        await s.clone("r1", "new", "nope")
    await s.snapshot("r1", "s1")
    with pytest.raises(AlreadyExists):
        await s.snapshot("r1", "s1")
    await s.create("r2")
    with pytest.raises(AlreadyExists):
        await s.clone("r1", "r2")
    with pytest.raises(AlreadyExists):
        await s.clone("r1", "r2", "s1")
    assert not await s.exists("new")
    # nothing half-made was left by the failures
    await s.destroy("r1")
    await s.destroy("r2")
    assert env.leftovers() == []


BAD_NAMES = ["", ".", "..", ".snapshots", "a/b", "../etc", "-x", "x" * 65, "a\x00b", "_clone-x"]


@pytest.mark.parametrize("bad", BAD_NAMES)
async def test_bad_names(env: Env, bad: str) -> None:
    s = env.storage
    await s.create("ok")
    with pytest.raises(InvalidName):
        s.path(bad)
    for call in (
        lambda: s.create(bad),
        lambda: s.exists(bad),
        lambda: s.destroy(bad),
        lambda: s.snapshot(bad, "s"),
        lambda: s.snapshot("ok", bad),
        lambda: s.snapshots(bad),
        lambda: s.delete_snapshot("ok", bad),
        lambda: s.rollback("ok", bad),
        lambda: s.clone(bad, "new"),
        lambda: s.clone("ok", bad),
        lambda: s.clone("ok", "new", bad),
        lambda: s.usage(bad),
    ):
        with pytest.raises(InvalidName):
            await call()
    assert await s.snapshots("ok") == []
    assert not await s.exists("new")


async def test_destroy_refuses_with_a_mount_inside(env: Env) -> None:
    s = env.storage
    root = await s.create("r1")
    outside = Path(tempfile.mkdtemp(prefix="agtest-outside-"))
    try:
        (outside / "precious").write_text("host data\n")
        (root / "mnt").mkdir()
        run_sync(["mount", "--bind", str(outside), str(root / "mnt")])
        try:
            with pytest.raises(MountBusy):
                await s.destroy("r1")
            assert (outside / "precious").exists()
            assert await s.exists("r1")
        finally:
            run_sync(["umount", str(root / "mnt")])
        await s.destroy("r1")
        assert (outside / "precious").read_text() == "host data\n"
    finally:
        shutil.rmtree(outside)


async def test_usage(env: Env) -> None:
    s = env.storage
    root = await s.create("r1")
    (root / "blob").write_bytes(os.urandom(2 << 20))
    used = await s.usage("r1")
    assert used > 0
    if env.kind != "zfs":  # zfs accounts for new blocks only when their txg commits
        assert used >= 2 << 20


async def test_dir_out_of_space_leaves_no_half_clone() -> None:
    top = Path(tempfile.mkdtemp(prefix="agtest-enospc-"))
    run_sync(["mount", "-t", "tmpfs", "-o", "size=8m", "agtest", str(top)])
    try:
        s = DirStorage(top / "roots")
        await s.probe()
        root = await s.create("big")
        (root / "blob").write_bytes(os.urandom(5 << 20))
        with pytest.raises(NoSpace):
            await s.clone("big", "copy")
        with pytest.raises(NoSpace):
            await s.snapshot("big", "s1")
        assert not await s.exists("copy")
        assert await s.snapshots("big") == []
        assert sorted(os.listdir(top / "roots")) == [SNAPSHOT_DIR, "big"]
        assert os.listdir(top / "roots" / SNAPSHOT_DIR / "big") == []
    finally:
        run_sync(["umount", str(top)])
        shutil.rmtree(top)


async def test_btrfs_nested_subvolumes_destroyed(env: Env) -> None:
    if env.kind != "btrfs":
        pytest.skip("btrfs only")
    s = env.storage
    root = await s.create("r1")
    run_sync(["btrfs", "subvolume", "create", str(root / "var-lib-machines")])
    run_sync(["btrfs", "subvolume", "create", str(root / "var-lib-machines/inner")])
    (root / "var-lib-machines/inner/f").write_text("x")
    await s.snapshot("r1", "s1")
    await s.rollback("r1", "s1")  # the old tree, nested subvolumes and all, goes
    run_sync(["btrfs", "subvolume", "create", str(root / "again")])
    await s.destroy("r1")
    assert env.leftovers() == []


async def test_snapshot_and_clone_timing(env: Env) -> None:
    """Not a benchmark assertion: prints the cost of snapshot+clone of ~50 MB."""
    s = env.storage
    root = await s.create("big")
    for i in range(50):
        d = root / f"d{i % 10}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(1 << 20))
    expected = manifest(root)
    t0 = time.monotonic()
    await s.snapshot("big", "s1")
    t1 = time.monotonic()
    clone = await s.clone("big", "big2", "s1")
    t2 = time.monotonic()
    print(
        f"\n[timing] {env.kind}: snapshot {1000 * (t1 - t0):.0f} ms, "
        f"clone {1000 * (t2 - t1):.0f} ms, total {1000 * (t2 - t0):.0f} ms (50 MiB, 50 files)"
    )
    assert manifest(clone) == expected
    await s.destroy("big2")
    await s.destroy("big")


# --- probing and the factory ----------------------------------------------------


async def test_probe_errors(env: Env) -> None:
    s = env.storage
    scratch = Path(tempfile.mkdtemp(prefix="agtest-probe-"))
    try:
        if isinstance(s, BtrfsStorage):
            with pytest.raises(BackendUnavailable, match="is not on btrfs"):
                await BtrfsStorage(scratch).probe()
            with pytest.raises(BackendUnavailable, match="does not exist"):
                await BtrfsStorage(scratch / "absent").probe()
        elif isinstance(s, ZfsStorage):
            pool = s.dataset.partition("/")[0]
            with pytest.raises(BackendUnavailable, match=f"zfs create -p {pool}/absent"):
                await ZfsStorage(f"{pool}/absent").probe()
            run_sync(["zfs", "create", "-o", "mountpoint=none", f"{s.dataset}/nomount"])
            with pytest.raises(BackendUnavailable, match="mountpoint=none"):
                await ZfsStorage(f"{s.dataset}/nomount").probe()
        else:
            (scratch / "file").write_text("")
            with pytest.raises(BackendUnavailable, match="not a directory"):
                await DirStorage(scratch / "file").probe()
            with pytest.raises(BackendUnavailable, match="cannot be created"):
                await DirStorage(scratch / "file" / "roots").probe()
    finally:
        shutil.rmtree(scratch)


def test_make_storage() -> None:
    cfg = Config(state_dir=Path("/srv/ag"))
    dir_storage = make_storage(cfg)
    assert isinstance(dir_storage, DirStorage)
    assert dir_storage.kind is Backend.DIR
    assert dir_storage.path("r") == Path("/srv/ag/roots/r")
    b = make_storage(Config(storage=StorageConfig(Backend.BTRFS, btrfs_path=Path("/b"))))
    assert isinstance(b, BtrfsStorage) and b.path("r") == Path("/b/r")
    z = make_storage(Config(storage=StorageConfig(Backend.ZFS, zfs_dataset="tank/ag")))
    assert isinstance(z, ZfsStorage) and z.dataset == "tank/ag"
    with pytest.raises(BackendUnavailable):
        make_storage(Config(storage=StorageConfig(Backend.ZFS)))
