"""The interface every storage backend implements, and helpers they share.

A root is a named tree; the backend owns where it lives and how it is
snapshotted and cloned. The public methods here validate every name before a
backend sees it (defence in depth: the API validates too), then call the
backend's `_method`. So no backend can forget a check.

Contract common to all backends (the integration suite holds each to it):
- a half-made root, snapshot or clone is never visible under its real name;
- `destroy` also removes the root's snapshots, is idempotent, and never
  removes another root (a clone survives its source), and refuses with
  MountBusy while anything is mounted below the root;
- `snapshots` lists user snapshots sorted by name;
- errors are typed: NotFound, AlreadyExists, BackendUnavailable, NoSpace,
  MountBusy, Conflict.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from autogentoo.daemon.config import Backend
from autogentoo.daemon.run import run
from autogentoo.errors import AgError, AlreadyExists, MountBusy, NoSpace, NotFound
from autogentoo.names import check_name

# Entries we make next to the roots start with '.', which no valid name does.
SNAPSHOT_DIR = ".snapshots"
TMP_PREFIX = ".tmp-"


class Storage(ABC):
    kind: Backend

    # --- public API: validate, then delegate ------------------------------

    @abstractmethod
    async def probe(self) -> None:
        """Raise BackendUnavailable, with a fix-it message, unless usable."""

    async def create(self, name: str) -> Path:
        """A new empty tree for root `name`; AlreadyExists if present."""
        return await self._create(_root(name))

    def path(self, name: str) -> Path:
        """Where the tree of `name` is (no I/O once probed)."""
        return self._path(_root(name))

    async def exists(self, name: str) -> bool:
        return await self._exists(_root(name))

    async def destroy(self, name: str) -> None:
        """Remove the root and its snapshots; absent is fine."""
        await self._destroy(_root(name))

    async def snapshot(self, name: str, snap: str) -> None:
        """A read-only, point-in-time copy of root `name` called `snap`."""
        await self._snapshot(_root(name), _snap(snap))

    async def snapshots(self, name: str) -> list[str]:
        """The root's snapshot names, sorted; NotFound if the root is absent."""
        return await self._snapshots(_root(name))

    async def delete_snapshot(self, name: str, snap: str) -> None:
        await self._delete_snapshot(_root(name), _snap(snap))

    async def rollback(self, name: str, snap: str) -> None:
        """Make the root's content that of `snap` again."""
        await self._rollback(_root(name), _snap(snap))

    async def clone(self, src: str, dst: str, snap: str | None = None) -> Path:
        """A new independent root `dst` from `src@snap`, or from src as it is now."""
        return await self._clone(
            _root(src, "source root name"),
            _root(dst, "new root name"),
            None if snap is None else _snap(snap),
        )

    async def usage(self, name: str) -> int:
        """Bytes the root uses (best effort; shared blocks may count once or twice)."""
        return await self._usage(_root(name))

    # --- what a backend implements ----------------------------------------

    @abstractmethod
    async def _create(self, name: str) -> Path: ...

    @abstractmethod
    def _path(self, name: str) -> Path: ...

    @abstractmethod
    async def _exists(self, name: str) -> bool: ...

    @abstractmethod
    async def _destroy(self, name: str) -> None: ...

    @abstractmethod
    async def _snapshot(self, name: str, snap: str) -> None: ...

    @abstractmethod
    async def _snapshots(self, name: str) -> list[str]: ...

    @abstractmethod
    async def _delete_snapshot(self, name: str, snap: str) -> None: ...

    @abstractmethod
    async def _rollback(self, name: str, snap: str) -> None: ...

    @abstractmethod
    async def _clone(self, src: str, dst: str, snap: str | None) -> Path: ...

    @abstractmethod
    async def _usage(self, name: str) -> int: ...

    # --- shared checks ------------------------------------------------------

    async def _need_root(self, name: str) -> None:
        if not await self._exists(name):
            raise NotFound(f"root {name!r} not found", root=name)

    async def _need_no_root(self, name: str) -> None:
        if await self._exists(name):
            raise AlreadyExists(f"root {name!r} already exists", root=name)


def _root(untrusted: object, what: str = "root name") -> str:
    return check_name(untrusted, what)


def _snap(untrusted: object) -> str:
    return check_name(untrusted, "snapshot name")


def tmp_name(what: str) -> str:
    """A hidden, unique sibling name for work in progress."""
    return f"{TMP_PREFIX}{what}-{secrets.token_hex(4)}"


# --- mounts ---------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    mountpoint: Path
    source: str
    fstype: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_below(path: Path) -> list[MountEntry]:
    """Mounts strictly below `path` in this mount namespace, deepest first."""
    found: list[MountEntry] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rest = right.split()
            if len(fields) < 5 or len(rest) < 2:
                continue
            mp = Path(_unescape(fields[4]))
            if mp != path and mp.is_relative_to(path):
                found.append(MountEntry(mp, _unescape(rest[1]), rest[0]))
    found.sort(key=lambda m: len(m.mountpoint.parts), reverse=True)
    return found


def refuse_if_mounted(name: str, path: Path, ignore_source_prefix: str | None = None) -> None:
    """MountBusy if something is mounted inside the root: deleting would follow it."""
    busy = [
        m
        for m in mounts_below(path)
        if ignore_source_prefix is None or not m.source.startswith(ignore_source_prefix)
    ]
    if busy:
        shown = ", ".join(str(m.mountpoint) for m in busy[:5])
        raise MountBusy(
            f"root {name!r} still has mounts inside it ({shown}); run `agctl cleanup {name}` first",
            root=name,
            mounts=[str(m.mountpoint) for m in busy],
        )


# --- renames ------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    rc = _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename, failing with FileExistsError rather than replacing dst."""
    try:
        _renameat2(src, dst, _RENAME_NOREPLACE)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        # The filesystem lacks the flag: check then rename (a small race,
        # covered by the per-root lock the daemon holds).
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)


def exchange(a: Path, b: Path) -> None:
    """Swap two trees atomically, so a crash leaves one or the other in place."""
    try:
        _renameat2(a, b, _RENAME_EXCHANGE)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        aside = b.with_name(tmp_name("swap"))
        os.rename(b, aside)
        os.rename(a, b)
        os.rename(aside, a)


def os_error(e: OSError, what: str) -> AgError:
    """Map an OSError from our own file operations to a typed error."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{what}: {e.strerror}")
    if e.errno == errno.EEXIST:
        return AlreadyExists(f"{what}: already exists")
    if e.errno == errno.ENOENT:
        return NotFound(f"{what}: not found")
    return AgError(f"{what}: {e.strerror}")


# --- tree helpers -------------------------------------------------------------


async def remove_tree(path: Path) -> None:
    """rm -rf that never crosses into another filesystem (a stray bind mount)."""
    if os.path.lexists(path):
        await run(["rm", "-rf", "--one-file-system", "--", str(path)])


async def copy_tree(src: Path, dst: Path) -> None:
    """Copy a tree keeping owners, modes, hard links, xattrs and capabilities.

    `-a` is --preserve=all, which includes xattrs (so security.capability,
    set again after chown cleared it); reflinks make it cheap where the
    filesystem shares extents. `-x` keeps a stray mount out of the copy.
    """
    await run(["cp", "-a", "-x", "--reflink=auto", "--", str(src), str(dst)])


async def disk_usage(path: Path) -> int:
    res = await run(["du", "-s", "-x", "-B1", "--", str(path)])
    return int(res.text.split()[0])


def is_real_dir(path: Path) -> bool:
    # a symlink named like a root is not a root
    return path.is_dir() and not path.is_symlink()
