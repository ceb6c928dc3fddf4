"""The `dir` backend: plain directories, works on any filesystem.

Roots are `<base>/<name>`, snapshots `<base>/.snapshots/<name>/<snap>`, both
full copies (`cp -a --reflink=auto`, so cheap on XFS/btrfs and correct
everywhere). Every copy is made under a hidden temporary name and renamed
into place, so a half-made snapshot or clone is never visible; rollback
builds the new tree aside and swaps it in with one atomic rename.

Snapshots here are read-only by convention only (nothing in the daemon
writes to them); the filesystem does not enforce it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from autogentoo.daemon.config import Backend
from autogentoo.daemon.storage.base import (
    SNAPSHOT_DIR,
    TMP_PREFIX,
    Storage,
    copy_tree,
    disk_usage,
    exchange,
    is_real_dir,
    os_error,
    refuse_if_mounted,
    remove_tree,
    rename_noreplace,
    tmp_name,
)
from autogentoo.errors import AlreadyExists, BackendUnavailable, NotFound


class DirStorage(Storage):
    kind = Backend.DIR

    def __init__(self, base: Path) -> None:
        self.base = base

    async def probe(self) -> None:
        if os.path.lexists(self.base) and not is_real_dir(self.base):
            raise BackendUnavailable(
                f"roots directory {self.base} is not a directory: check state_dir"
            )
        try:
            self.base.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise BackendUnavailable(
                f"roots directory {self.base} cannot be created ({e.strerror}): "
                "check state_dir in the daemon config"
            ) from None
        if not os.access(self.base, os.W_OK | os.X_OK):
            raise BackendUnavailable(f"roots directory {self.base} is not writable")

    def _path(self, name: str) -> Path:
        return self.base / name

    def _snapdir(self, name: str) -> Path:
        return self.base / SNAPSHOT_DIR / name

    def _snap_path(self, name: str, snap: str) -> Path:
        return self._snapdir(name) / snap

    async def _exists(self, name: str) -> bool:
        return is_real_dir(self._path(name))

    async def _create(self, name: str) -> Path:
        path = self._path(name)
        try:
            self.base.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.mkdir(mode=0o755)
        except OSError as e:
            raise os_error(e, f"root {name!r}") from None
        return path

    async def _destroy(self, name: str) -> None:
        path = self._path(name)
        if is_real_dir(path):
            refuse_if_mounted(name, path)
            # Rename first: the root vanishes at once, and an interrupted
            # removal leaves only a hidden temporary behind.
            doomed = self.base / tmp_name(f"destroy-{name}")
            os.rename(path, doomed)
            await remove_tree(doomed)
        snapdir = self._snapdir(name)
        if os.path.lexists(snapdir):
            doomed = self.base / SNAPSHOT_DIR / tmp_name(f"destroy-{name}")
            os.rename(snapdir, doomed)
            await remove_tree(doomed)

    async def _snapshot(self, name: str, snap: str) -> None:
        await self._need_root(name)
        target = self._snap_path(name, snap)
        if os.path.lexists(target):
            raise AlreadyExists(f"snapshot {name}@{snap} already exists", root=name, snapshot=snap)
        try:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise os_error(e, f"snapshot {name}@{snap}") from None
        await self._copy_into_place(self._path(name), target, f"snapshot {name}@{snap}")

    async def _snapshots(self, name: str) -> list[str]:
        await self._need_root(name)
        try:
            entries = os.listdir(self._snapdir(name))
        except FileNotFoundError:
            return []
        return sorted(e for e in entries if not e.startswith(TMP_PREFIX))

    async def _need_snapshot(self, name: str, snap: str) -> Path:
        await self._need_root(name)
        target = self._snap_path(name, snap)
        if not is_real_dir(target):
            raise NotFound(f"snapshot {name}@{snap} not found", root=name, snapshot=snap)
        return target

    async def _delete_snapshot(self, name: str, snap: str) -> None:
        target = await self._need_snapshot(name, snap)
        doomed = target.with_name(tmp_name(f"delete-{snap}"))
        os.rename(target, doomed)
        await remove_tree(doomed)

    async def _rollback(self, name: str, snap: str) -> None:
        source = await self._need_snapshot(name, snap)
        path = self._path(name)
        refuse_if_mounted(name, path)
        fresh = self.base / tmp_name(f"rollback-{name}")
        try:
            await copy_tree(source, fresh)
            exchange(fresh, path)
        except BaseException:
            # The old root is still in place; drop only the partial copy.
            with contextlib.suppress(Exception):
                await remove_tree(fresh)
            raise
        # `fresh` now holds the old content.
        await remove_tree(fresh)

    async def _clone(self, src: str, dst: str, snap: str | None) -> Path:
        source = self._path(src) if snap is None else await self._need_snapshot(src, snap)
        if snap is None:
            await self._need_root(src)
        await self._need_no_root(dst)
        target = self._path(dst)
        await self._copy_into_place(source, target, f"root {dst!r}")
        return target

    async def _copy_into_place(self, source: Path, target: Path, what: str) -> None:
        partial = target.with_name(tmp_name(target.name))
        try:
            await copy_tree(source, partial)
            rename_noreplace(partial, target)
        except BaseException as e:
            with contextlib.suppress(Exception):
                await remove_tree(partial)
            if isinstance(e, OSError):
                raise os_error(e, what) from None
            raise

    async def _usage(self, name: str) -> int:
        await self._need_root(name)
        return await disk_usage(self._path(name))
