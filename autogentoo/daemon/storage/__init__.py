"""Storage backends for roots: where a root's tree lives and how it is
snapshotted and cloned. `make_storage` picks one from the daemon config."""

from __future__ import annotations

from autogentoo.daemon.config import Backend, Config
from autogentoo.daemon.storage.base import Storage
from autogentoo.daemon.storage.btrfs import BtrfsStorage
from autogentoo.daemon.storage.dir import DirStorage
from autogentoo.daemon.storage.zfs import ZfsStorage
from autogentoo.errors import BackendUnavailable

__all__ = ["BtrfsStorage", "DirStorage", "Storage", "ZfsStorage", "make_storage"]


def make_storage(cfg: Config, backend: Backend | None = None) -> Storage:
    """A backend (the configured default unless named); `await storage.probe()` before use."""
    s = cfg.storage
    match backend or s.backend:
        case Backend.DIR:
            return DirStorage(cfg.roots_dir)
        case Backend.BTRFS:
            if s.btrfs_path is None:
                raise BackendUnavailable("storage.btrfs_path: required for the btrfs backend")
            return BtrfsStorage(s.btrfs_path)
        case Backend.ZFS:
            if s.zfs_dataset is None:
                raise BackendUnavailable("storage.zfs_dataset: required for the zfs backend")
            return ZfsStorage(s.zfs_dataset)
