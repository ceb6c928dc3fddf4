"""The daemon's long-lived parts, owned by one object and shared with the routes."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from autogentoo.daemon.artifacts import Store
from autogentoo.daemon.config import Config
from autogentoo.daemon.jobs import JobManager
from autogentoo.daemon.packroot import ScanCache
from autogentoo.daemon.state import State

if TYPE_CHECKING:
    from autogentoo.daemon.spawner import Spawner
    from autogentoo.daemon.storage.base import Storage

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.started = time.time()
        self.under_systemd = bool(os.environ.get("NOTIFY_SOCKET"))
        for d in (
            config.state_dir,
            config.logs_dir,
            config.artifacts_dir,
            config.tmp_dir,
            config.uploads_dir,
        ):
            d.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.state = State(config.db_path)
        self.jobs = JobManager(self.state, config.logs_dir, config.jobs.max_parallel)
        self.openapi_doc: dict[str, Any] | None = None
        self.artifacts = Store(self.state, config.artifacts_dir)
        self.scan_cache = ScanCache()
        # Tokens derived from job generations are only meaningful within one
        # daemon run: a restart must not trust walks made by the previous one.
        self.boot_id = secrets.token_hex(4)
        self._storages: dict[Any, Storage] = {}
        self._spawner: Spawner | None = None

    @property
    def storage(self) -> Storage:
        """The default backend, where new roots go unless asked otherwise."""
        return self.storage_for(str(self.config.storage.backend))

    def storage_for(self, backend: str) -> Storage:
        """A backend by name: dir always; btrfs and zfs when configured."""
        from autogentoo.daemon.config import Backend
        from autogentoo.daemon.storage import make_storage
        from autogentoo.errors import InvalidArgument

        try:
            kind = Backend(backend)
        except ValueError:
            raise InvalidArgument(
                f"{backend!r} is not a storage backend (dir, btrfs, zfs)"
            ) from None
        if kind not in self._storages:
            self._storages[kind] = make_storage(self.config, kind)
        return self._storages[kind]

    def storage_of(self, root: str) -> Storage:
        """The backend a root lives on (recorded when it was made)."""
        row = self.state.one("SELECT backend FROM roots WHERE name=?", (root,))
        return self.storage_for(row["backend"]) if row else self.storage

    @property
    def spawner(self) -> Spawner:
        if self._spawner is None:
            from autogentoo.daemon.spawner import Spawner

            self._spawner = Spawner()
        return self._spawner

    async def start(self) -> None:
        from autogentoo.daemon import uploads
        from autogentoo.daemon.pathsafe import check_openat2

        check_openat2()
        await self.storage.probe()
        self.jobs.recover()
        _clear_dir(self.config.tmp_dir)
        uploads.recover(self.state, self.config.uploads_dir)
        self.artifacts.recover()
        from autogentoo.daemon.kernels import prune_builds

        pruned = await asyncio.to_thread(prune_builds, self.config.caches.kernel_builds)
        if pruned:
            log.info("removed %d kernel build directories unused for 30 days", len(pruned))
        from autogentoo.daemon import roots

        await roots.recover(self)
        # Start the fork server now, not on the first job: the first
        # `agctl run` should be as fast as the hundredth.
        await self.spawner.start()

    async def stop(self) -> None:
        await self.jobs.stop()
        if self._spawner is not None:
            await self._spawner.stop()
        self.state.close()


def _clear_dir(path: Path) -> None:
    """Remove what a crashed daemon left in its scratch directory."""
    import shutil

    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


DAEMON = web.AppKey("daemon", Daemon)
