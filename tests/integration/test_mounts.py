"""Host-side mount handling: mountinfo parsing and cleanup under a root, for real.

The mounts are made by hand with mount(8), the way a person (or the old
scripts) would leave them, in the host namespace, under a temp directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from autogentoo.daemon import linux, mounts
from autogentoo.errors import MountBusy

F = TypeVar("F", bound=Callable[..., Any])

_root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")


def needs_root(f: F) -> F:
    return pytest.mark.integration(_root_only(f))  # type: ignore[no-any-return]


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


@pytest.fixture
def base() -> Iterator[Path]:
    """A temp dir; whatever is still mounted under it is detached at the end."""
    d = Path(tempfile.mkdtemp(prefix="ag-mounts-"))
    try:
        yield d
    finally:
        for _ in range(20):
            left = mounts.mounts_under(str(d), include_root=True)
            if not left:
                break
            for m in left:
                try:
                    linux.mount(None, m.mount_point, None, linux.MS_PRIVATE)
                    linux.umount2(m.mount_point, linux.MNT_DETACH)
                except OSError:
                    pass
        assert not mounts.mounts_under(str(d), include_root=True)
        shutil.rmtree(d)


def test_parse_unescapes_and_splits() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root "
        "rw,errors=continue\n"
        "37 36 0:5 / /a\\134b\\011c rw - tmpfs tmp\\040fs rw\n"
    )
    a, b = mounts.parse_mountinfo_text(text)
    assert a.mount_id == 36 and a.parent_id == 35 and a.root == "/mnt1"
    assert a.mount_point == "/mnt/with space"
    assert a.optional == ("master:1",) and a.fstype == "ext3"
    assert a.super_options == ("rw", "errors=continue")
    assert b.mount_point == "/a\\b\tc" and b.source == "tmp fs"


def test_parse_real_mountinfo_has_root() -> None:
    assert any(m.mount_point == "/" for m in mounts.parse_mountinfo())


def test_tree_depth_orders_children_and_stacks_first() -> None:
    text = (
        "1 0 0:1 / / rw - ext4 r rw\n"
        "10 1 0:2 / /r/a rw - tmpfs t rw\n"
        "11 10 0:3 / /r/a rw - tmpfs t rw\n"  # stacked on 10
        "12 11 0:4 / /r/a/b rw - tmpfs t rw\n"  # child of the top one
        "13 1 0:5 / /r/z/y/x rw - tmpfs t rw\n"
    )  # deep path, shallow tree
    found = mounts.mounts_under("/r", mountinfo=mounts.parse_mountinfo_text(text))
    order = [m.mount_id for m in found]
    assert order.index(12) < order.index(11) < order.index(10)
    assert 1 not in order


@needs_root
def test_nested_hand_made_mounts_removed_in_one_call(base: Path) -> None:
    root, src, outside = base / "root", base / "src", base / "outside"
    for d in (root / "a", root / "b", src / "sub", outside):
        d.mkdir(parents=True)
    mount("--bind", str(src), str(root / "a"))
    mount("-t", "tmpfs", "t1", str(root / "a/sub"))
    os.makedirs(root / "a/sub/deeper")
    mount("-t", "tmpfs", "t2", str(root / "a/sub/deeper"))
    mount("-t", "tmpfs", "t3", str(root / "b"))
    mount("-t", "tmpfs", "t4", str(root / "b"))  # stacked
    mount("--bind", str(src), str(outside))  # not under root: must survive
    try:
        removed = mounts.cleanup_under_sync(str(root))
        assert len(removed) == 5
        # deepest first: every mount goes before the one it sits on
        assert removed.index(str(root / "a/sub/deeper")) < removed.index(str(root / "a/sub"))
        assert removed.index(str(root / "a/sub")) < removed.index(str(root / "a"))
        assert mounts.mounts_under(str(root)) == []
        assert mounts.is_mountpoint(str(outside))
        assert mounts.cleanup_under_sync(str(root)) == []  # and again: nothing to do
    finally:
        subprocess.run(["umount", str(outside)], check=False)


@needs_root
def test_cleanup_through_a_symlinked_path(base: Path) -> None:
    root = base / "root"
    (root / "x").mkdir(parents=True)
    (base / "link").symlink_to(root)
    mount("-t", "tmpfs", "t", str(root / "x"))
    assert mounts.is_mountpoint(str(base / "link/x"))
    assert mounts.cleanup_under_sync(str(base / "link")) == [str(root / "x")]
    assert not mounts.is_mountpoint(str(root / "x"))


@needs_root
def test_root_own_mount_kept_unless_asked(base: Path) -> None:
    root = base / "root"
    root.mkdir()
    mount("-t", "tmpfs", "r", str(root))
    (root / "in").mkdir()
    mount("-t", "tmpfs", "i", str(root / "in"))
    assert mounts.cleanup_under_sync(str(root)) == [str(root / "in")]
    assert mounts.is_mountpoint(str(root))
    assert mounts.cleanup_under_sync(str(root), include_root=True) == [str(root)]


@needs_root
def test_is_mountpoint_sees_same_fs_binds(base: Path) -> None:
    (base / "a").mkdir()
    (base / "b").mkdir()
    assert not mounts.is_mountpoint(str(base / "b"))
    mount("--bind", str(base / "a"), str(base / "b"))
    assert mounts.is_mountpoint(str(base / "b"))
    mounts.cleanup_under_sync(str(base))


@needs_root
def test_cleanup_does_not_propagate_to_a_shared_source(base: Path) -> None:
    # The old scripts' bug: ROOT/dev is an rbind of a shared /dev; unmounting
    # ROOT/dev/pts propagated and took the host's /dev/pts with it.
    host = base / "hostdev"
    root = base / "root"
    host.mkdir()
    (root / "dev").mkdir(parents=True)
    mount("-t", "tmpfs", "hostdev", str(host))
    mount("--make-shared", str(host))
    (host / "pts").mkdir()
    mount("-t", "tmpfs", "hostpts", str(host / "pts"))
    mount("--rbind", str(host), str(root / "dev"))
    assert mounts.is_mountpoint(str(root / "dev/pts"))
    mounts.cleanup_under_sync(str(root))
    assert mounts.mounts_under(str(root)) == []
    assert mounts.is_mountpoint(str(host / "pts")), "cleanup unmounted the source's submount"


@needs_root
def test_busy_mount_names_the_holder(base: Path) -> None:
    root = base / "root"
    (root / "held").mkdir(parents=True)
    mount("-t", "tmpfs", "held", str(root / "held"))
    proc = subprocess.Popen(["sleep", "1000"], cwd=root / "held")
    try:
        with pytest.raises(MountBusy) as err:
            mounts.cleanup_under_sync(str(root))
        assert str(root / "held") in err.value.message
        assert f"[{proc.pid}]" in err.value.message and "sleep" in err.value.message
        assert err.value.details["mount"] == str(root / "held")
        assert {"pid": proc.pid, "comm": "sleep", "how": "cwd"} in err.value.details["holders"]
    finally:
        proc.kill()
        proc.wait()
    assert mounts.cleanup_under_sync(str(root)) == [str(root / "held")]


@needs_root
async def test_cleanup_under_async(base: Path) -> None:
    (base / "r/x").mkdir(parents=True)
    mount("-t", "tmpfs", "t", str(base / "r/x"))
    assert await mounts.cleanup_under(str(base / "r")) == [str(base / "r/x")]
