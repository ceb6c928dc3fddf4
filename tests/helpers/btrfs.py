"""A throwaway btrfs filesystem for tests: sparse file, loop device, mount.

Everything is undone in teardown, on failure too: unmount (lazily if busy),
detach the loop device, remove the files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from autogentoo.daemon.run import run_sync
from autogentoo.daemon.storage.base import mounts_below

SIZE = 256 << 20


def btrfs_usable() -> str | None:
    """Why btrfs tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("mkfs.btrfs", "btrfs", "losetup"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install btrfs-progs)"
    return None


@contextlib.contextmanager
def btrfs_filesystem(size: int = SIZE) -> Iterator[Path]:
    """Yield the mountpoint of a fresh btrfs filesystem."""
    top = Path(tempfile.mkdtemp(prefix="agtest-btrfs-"))
    image, mnt = top / "fs.img", top / "mnt"
    loop: str | None = None
    mounted = False
    try:
        mnt.mkdir()
        with open(image, "wb") as f:
            f.truncate(size)
        run_sync(["mkfs.btrfs", "-q", str(image)])
        loop = run_sync(["losetup", "-f", "--show", str(image)]).text.strip()
        run_sync(["mount", "-t", "btrfs", loop, str(mnt)])
        mounted = True
        yield mnt
    finally:
        if mounted:
            for m in mounts_below(mnt):  # anything a failed test left inside
                run_sync(["umount", "-l", str(m.mountpoint)], check=False)
            if run_sync(["umount", str(mnt)], check=False).returncode != 0:
                run_sync(["umount", "-l", str(mnt)], check=False)
        if loop:
            # After a lazy umount the device may still be held: -d then marks it
            # autoclear, and the kernel frees it on release.
            run_sync(["losetup", "-d", loop], check=False)
        if not os.path.ismount(mnt) and not mounts_below(top):
            shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def btrfs_mount() -> Iterator[Path]:
    reason = btrfs_usable()
    if reason:
        pytest.skip(f"btrfs: {reason}")
    with btrfs_filesystem() as mnt:
        yield mnt
