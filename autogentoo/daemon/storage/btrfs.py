"""The `btrfs` backend: each root a subvolume, snapshots read-only subvolumes.

Roots are `<btrfs_path>/<name>`, snapshots `<btrfs_path>/.snapshots/<name>/<snap>`
(`btrfs subvolume snapshot -r`). A clone is a writable snapshot, and owes
nothing to its source afterwards. Rollback makes a writable snapshot of the
snapshot under a hidden name and swaps it in with one atomic rename, so a
failure midway leaves the old root intact.

A root may hold subvolumes of its own (systemd-tmpfiles and some build
tools make them inside a chroot); destroy removes those deepest first, since
btrfs refuses to delete a subvolume that still contains one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from pathlib import Path

from autogentoo.daemon.config import Backend
from autogentoo.daemon.run import run
from autogentoo.daemon.storage.base import (
    SNAPSHOT_DIR,
    TMP_PREFIX,
    Storage,
    disk_usage,
    exchange,
    is_real_dir,
    os_error,
    refuse_if_mounted,
    tmp_name,
)
from autogentoo.errors import AlreadyExists, BackendUnavailable, NotFound

# The inode number of every btrfs subvolume's top directory.
SUBVOL_INO = 256


class BtrfsStorage(Storage):
    kind = Backend.BTRFS

    def __init__(self, base: Path) -> None:
        self.base = base

    async def probe(self) -> None:
        if not is_real_dir(self.base):
            raise BackendUnavailable(
                f"storage.btrfs_path {self.base} does not exist: create it on a btrfs "
                f"filesystem (btrfs subvolume create {self.base})"
            )
        try:
            res = await run(["stat", "-f", "-c", "%T", str(self.base)])
        except FileNotFoundError:
            raise BackendUnavailable("stat not found: install coreutils") from None
        fstype = res.text.strip()
        if fstype != "btrfs":
            raise BackendUnavailable(
                f"storage.btrfs_path {self.base} is not on btrfs (it is on {fstype}): "
                "point it at a directory on a btrfs filesystem"
            )
        try:
            await run(["btrfs", "--version"])
        except FileNotFoundError:
            raise BackendUnavailable("btrfs command not found: install btrfs-progs") from None

    def _path(self, name: str) -> Path:
        return self.base / name

    def _snapdir(self, name: str) -> Path:
        return self.base / SNAPSHOT_DIR / name

    async def _exists(self, name: str) -> bool:
        return is_real_dir(self._path(name))

    async def _create(self, name: str) -> Path:
        await self._need_no_root(name)
        path = self._path(name)
        await run(["btrfs", "subvolume", "create", str(path)])
        return path

    async def _destroy(self, name: str) -> None:
        path = self._path(name)
        if is_real_dir(path):
            refuse_if_mounted(name, path)
            # Hide it first, so it vanishes at once and a partial delete
            # is never mistaken for the root.
            doomed = self.base / tmp_name(f"destroy-{name}")
            os.rename(path, doomed)
            await self._delete_tree(doomed)
        snapdir = self._snapdir(name)
        if is_real_dir(snapdir):
            for entry in sorted(os.listdir(snapdir)):
                await self._delete_tree(snapdir / entry)
            os.rmdir(snapdir)

    async def _delete_tree(self, top: Path) -> None:
        """Delete subvolume `top` with every subvolume nested in it, deepest first."""
        nested = await asyncio.to_thread(_subvolumes_below, top)
        for sub in nested:
            await run(["btrfs", "subvolume", "delete", str(sub)])
        if _is_subvolume(top):
            await run(["btrfs", "subvolume", "delete", str(top)])
        elif os.path.lexists(top):
            await run(["rm", "-rf", "--one-file-system", "--", str(top)])

    async def _snapshot(self, name: str, snap: str) -> None:
        await self._need_root(name)
        target = self._snapdir(name) / snap
        if os.path.lexists(target):
            raise AlreadyExists(f"snapshot {name}@{snap} already exists", root=name, snapshot=snap)
        try:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise os_error(e, f"snapshot {name}@{snap}") from None
        # A btrfs snapshot appears whole or not at all.
        await run(["btrfs", "subvolume", "snapshot", "-r", str(self._path(name)), str(target)])

    async def _snapshots(self, name: str) -> list[str]:
        await self._need_root(name)
        try:
            entries = os.listdir(self._snapdir(name))
        except FileNotFoundError:
            return []
        return sorted(e for e in entries if not e.startswith(TMP_PREFIX))

    async def _need_snapshot(self, name: str, snap: str) -> Path:
        await self._need_root(name)
        target = self._snapdir(name) / snap
        if not is_real_dir(target):
            raise NotFound(f"snapshot {name}@{snap} not found", root=name, snapshot=snap)
        return target

    async def _delete_snapshot(self, name: str, snap: str) -> None:
        target = await self._need_snapshot(name, snap)
        await self._delete_tree(target)

    async def _rollback(self, name: str, snap: str) -> None:
        source = await self._need_snapshot(name, snap)
        path = self._path(name)
        refuse_if_mounted(name, path)
        fresh = self.base / tmp_name(f"rollback-{name}")
        await run(["btrfs", "subvolume", "snapshot", str(source), str(fresh)])
        try:
            exchange(fresh, path)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._delete_tree(fresh)
            raise
        # `fresh` now holds the old content.
        await self._delete_tree(fresh)

    async def _clone(self, src: str, dst: str, snap: str | None) -> Path:
        if snap is None:
            await self._need_root(src)
            source = self._path(src)
        else:
            source = await self._need_snapshot(src, snap)
        await self._need_no_root(dst)
        target = self._path(dst)
        await run(["btrfs", "subvolume", "snapshot", str(source), str(target)])
        return target

    async def _usage(self, name: str) -> int:
        # Without quotas btrfs cannot say what a subvolume owns; du counts
        # what it references, shared extents included.
        await self._need_root(name)
        return await disk_usage(self._path(name))


def _is_subvolume(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_ino == SUBVOL_INO


def _subvolumes_below(top: Path) -> list[Path]:
    """Subvolumes strictly inside `top`, deepest first. Does not follow symlinks."""
    found: list[tuple[int, Path]] = []

    def walk(directory: Path, depth: int) -> None:
        try:
            it = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return
        with it:
            for entry in it:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                child = Path(entry.path)
                # readdir's d_ino is the subvolume id here; lstat gives 256
                if entry.stat(follow_symlinks=False).st_ino == SUBVOL_INO:
                    found.append((depth, child))
                walk(child, depth + 1)

    walk(top, 1)
    found.sort(key=lambda item: item[0], reverse=True)
    return [p for _, p in found]
