"""The `zfs` backend (the seed's): each root a dataset under `storage.zfs_dataset`.

Roots are `<dataset>/<name>`, mounted where the parent's mountpoint puts
them; snapshots are `<dataset>/<name>@<snap>`; a clone is `zfs clone`.

ZFS clones depend on their origin snapshot, which the other backends do not
have. The rule here: roots look independent, and destroying one never
destroys another.
- Cloning from a root's current state takes a hidden snapshot
  `@_clone-<dst>` ('_' starts no valid name, so users never see or collide
  with it).
- Destroying a root that others were cloned from first `zfs promote`s those
  clones, so they take over the shared blocks, then destroys the root with
  `-r` (its own snapshots), never `-R` (which would take the clones along).
  The root's snapshots that a promote moved onto a clone are deleted, or
  renamed `@_held-*` while yet another root still depends on them.
- Deleting a snapshot that a root was cloned from renames it `@_held-*`.
- Hidden snapshots go as soon as nothing depends on them (when the last
  root cloned from them is destroyed).
- Rollback is `zfs rollback -r`: snapshots newer than the target are
  discarded (unlike dir and btrfs, which keep them). If a root was cloned
  from a newer state, rollback refuses with Conflict naming it.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from autogentoo.daemon.config import Backend
from autogentoo.daemon.run import Result, run, run_sync
from autogentoo.daemon.storage.base import Storage, refuse_if_mounted
from autogentoo.errors import (
    AlreadyExists,
    BackendUnavailable,
    CommandFailed,
    Conflict,
    MountBusy,
    NoSpace,
    NotFound,
)

HIDDEN = "_"
CLONE_PREFIX = "_clone-"
HELD_PREFIX = "_held-"
# ~10 s of backoff for a mount the kernel is still letting go of
BUSY_RETRIES = 14


class ZfsStorage(Storage):
    kind = Backend.ZFS

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset.strip("/")
        self._mountpoint: Path | None = None

    # --- probing ------------------------------------------------------------

    async def probe(self) -> None:
        ds = self.dataset
        try:
            res = await run(
                ["zfs", "get", "-H", "-o", "value", "mountpoint,mounted", ds], check=False
            )
        except FileNotFoundError:
            raise BackendUnavailable(
                "zfs command not found: install zfsutils-linux (or zfs-fuse)"
            ) from None
        if res.returncode != 0:
            err = res.stderr.decode("utf-8", "replace").strip()
            if "does not exist" in err:
                raise BackendUnavailable(
                    f"zfs dataset {ds} not found: create it with `zfs create -p {ds}`",
                    dataset=ds,
                )
            raise BackendUnavailable(f"zfs is not usable: {' / '.join(err.splitlines()[-3:])}")
        values = res.text.split("\n")
        mountpoint, mounted = values[0].strip(), values[1].strip() if len(values) > 1 else ""
        if not mountpoint.startswith("/"):
            raise BackendUnavailable(
                f"zfs dataset {ds} has mountpoint={mountpoint}: give it one with "
                f"`zfs set mountpoint=/var/lib/autogentoo/roots {ds}`"
            )
        if mounted != "yes":
            raise BackendUnavailable(f"zfs dataset {ds} is not mounted: `zfs mount {ds}`")
        self._mountpoint = Path(mountpoint)

    def _path(self, name: str) -> Path:
        if self._mountpoint is None:
            # Not probed yet: ask once; afterwards path() does no I/O.
            res = run_sync(["zfs", "get", "-H", "-o", "value", "mountpoint", self.dataset])
            self._mountpoint = Path(res.text.strip())
        return self._mountpoint / name

    # --- zfs plumbing -------------------------------------------------------

    def _ds(self, name: str) -> str:
        return f"{self.dataset}/{name}"

    async def _zfs(self, *args: str, busy_retries: int = 0) -> Result:
        """Run zfs; with busy_retries, retry an unmount that is busy for a moment.

        Callers that pass busy_retries have checked that nothing is mounted
        inside the root: what is left is the kernel letting go of a mount it
        used a moment ago (zfs-fuse shows this right after any access).
        """
        delay = 0.05
        for attempt in range(busy_retries + 1):
            try:
                return await run(["zfs", *args])
            except CommandFailed as e:
                msg = e.message
                if "out of space" in msg:
                    raise NoSpace(msg) from None
                if "busy" not in msg:
                    raise
                if attempt == busy_retries:
                    raise MountBusy(
                        f"{msg}: a process may be using it (see `fuser -vm` on its mountpoint)"
                    ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")

    async def _dataset_exists(self, ds: str) -> bool:
        res = await run(["zfs", "list", "-H", "-o", "name", ds], check=False)
        if res.returncode == 0:
            return True
        err = res.stderr.decode("utf-8", "replace")
        if "does not exist" in err:
            return False
        raise BackendUnavailable(f"zfs is not usable: {err.strip()}")

    async def _snaps(self, ds: str) -> list[str]:
        """Full snapshot names of `ds` (only its own), oldest first."""
        res = await self._zfs(
            "list", "-H", "-t", "snapshot", "-o", "name", "-s", "createtxg", "-d", "1", ds
        )
        return [line for line in res.text.splitlines() if line.startswith(ds + "@")]

    async def _dependents(self) -> dict[str, list[str]]:
        """origin snapshot -> datasets cloned from it, under our parent dataset."""
        res = await self._zfs(
            "list", "-H", "-o", "name,origin", "-t", "filesystem", "-r", self.dataset
        )
        deps: dict[str, list[str]] = {}
        for line in res.text.splitlines():
            name, _, origin = line.partition("\t")
            if origin and origin != "-":
                deps.setdefault(origin, []).append(name)
        return deps

    async def _origin(self, ds: str) -> str | None:
        res = await self._zfs("get", "-H", "-o", "value", "origin", ds)
        value = res.text.strip()
        return None if value in ("", "-") else value

    def _root_of(self, ds: str) -> str:
        return ds.removeprefix(self.dataset + "/")

    @staticmethod
    def _hidden(full: str) -> bool:
        return full.partition("@")[2].startswith(HIDDEN)

    async def _hide(self, full: str) -> str:
        ds = full.partition("@")[0]
        hidden = f"{ds}@{HELD_PREFIX}{secrets.token_hex(6)}"
        await self._zfs("rename", full, hidden)
        return hidden

    async def _drop_if_unused(self, full: str) -> None:
        if full not in await self._dependents():
            await self._zfs("destroy", full)

    # --- the interface ------------------------------------------------------

    async def _exists(self, name: str) -> bool:
        return await self._dataset_exists(self._ds(name))

    async def _create(self, name: str) -> Path:
        await self._need_no_root(name)
        try:
            await self._zfs("create", self._ds(name))
        except CommandFailed as e:
            if "already exists" in e.message:
                raise AlreadyExists(f"root {name!r} already exists", root=name) from None
            raise
        return self._path(name)

    async def _destroy(self, name: str) -> None:
        ds = self._ds(name)
        if not await self._dataset_exists(ds):
            return
        # Mounts of its own child datasets are ZFS's business; anything else is not.
        refuse_if_mounted(name, self._path(name), ignore_source_prefix=ds + "/")
        own = await self._snaps(ds)
        deps = await self._dependents()
        if any(s in deps for s in own):
            # Out of the way of the clones' own snapshot names before promote moves them.
            for s in own:
                if not self._hidden(s):
                    await self._hide(s)
            await self._hand_over(ds)
        origin = await self._origin(ds)
        await self._zfs("destroy", "-r", ds, busy_retries=BUSY_RETRIES)
        if origin is not None and self._hidden(origin):
            await self._drop_if_unused(origin)

    async def _hand_over(self, ds: str) -> None:
        """Promote the clones of `ds` until none depends on it."""
        while True:
            own = await self._snaps(ds)
            deps = await self._dependents()
            heirs = [(i, clone) for i, s in enumerate(own) for clone in deps.get(s, [])]
            if not heirs:
                return
            # The clone of the newest snapshot takes that one and all before it.
            _, heir = max(heirs)
            before = set(await self._snaps(heir))
            await self._zfs("promote", heir, busy_retries=BUSY_RETRIES)
            moved = [s for s in await self._snaps(heir) if s not in before]
            deps = await self._dependents()
            for s in moved:
                if s not in deps:
                    await self._zfs("destroy", s)

    async def _snapshot(self, name: str, snap: str) -> None:
        await self._need_root(name)
        full = f"{self._ds(name)}@{snap}"
        if full in await self._snaps(self._ds(name)):
            raise AlreadyExists(f"snapshot {name}@{snap} already exists", root=name, snapshot=snap)
        await self._zfs("snapshot", full)

    async def _snapshots(self, name: str) -> list[str]:
        await self._need_root(name)
        snaps = await self._snaps(self._ds(name))
        return sorted(s.partition("@")[2] for s in snaps if not self._hidden(s))

    async def _need_snapshot(self, name: str, snap: str) -> str:
        await self._need_root(name)
        full = f"{self._ds(name)}@{snap}"
        if full not in await self._snaps(self._ds(name)):
            raise NotFound(f"snapshot {name}@{snap} not found", root=name, snapshot=snap)
        return full

    async def _delete_snapshot(self, name: str, snap: str) -> None:
        full = await self._need_snapshot(name, snap)
        if full in await self._dependents():
            # Another root still shares its blocks: keep it, out of sight.
            await self._hide(full)
        else:
            await self._zfs("destroy", full)

    async def _rollback(self, name: str, snap: str) -> None:
        full = await self._need_snapshot(name, snap)
        ds = self._ds(name)
        own = await self._snaps(ds)
        newer = own[own.index(full) + 1 :]
        deps = await self._dependents()
        blocked = sorted(self._root_of(c) for s in newer for c in deps.get(s, []))
        if blocked:
            raise Conflict(
                f"cannot roll back {name!r} to {snap!r}: root(s) {', '.join(blocked)} were "
                "cloned from a later state of it and zfs would have to destroy them; "
                "destroy them first",
                root=name,
                snapshot=snap,
                clones=blocked,
            )
        refuse_if_mounted(name, self._path(name), ignore_source_prefix=ds + "/")
        await self._zfs("rollback", "-r", full, busy_retries=BUSY_RETRIES)

    async def _clone(self, src: str, dst: str, snap: str | None) -> Path:
        temporary = snap is None
        if snap is None:
            await self._need_root(src)
            origin = f"{self._ds(src)}@{CLONE_PREFIX}{dst}"
        else:
            origin = await self._need_snapshot(src, snap)
        await self._need_no_root(dst)
        if temporary:
            if origin in await self._snaps(self._ds(src)):
                # left by an interrupted clone: dst does not exist, so nothing uses it
                await self._drop_if_unused(origin)
            await self._zfs("snapshot", origin)
        try:
            await self._zfs("clone", origin, self._ds(dst))
        except BaseException:
            if temporary:
                await self._drop_if_unused(origin)
            raise
        return self._path(dst)

    async def _usage(self, name: str) -> int:
        await self._need_root(name)
        res = await self._zfs("get", "-H", "-p", "-o", "value", "used", self._ds(name))
        return int(res.text.strip())
