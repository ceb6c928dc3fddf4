"""Choosing a root's storage backend per root, through the daemon."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers.btrfs import btrfs_filesystem, btrfs_usable
from tests.helpers.daemon import running_daemon
from tests.helpers.stage3 import make_stage3

pytestmark = pytest.mark.integration


def test_root_on_btrfs_beside_dir_roots(workdir: Path) -> None:
    if (why := btrfs_usable()) is not None:
        pytest.skip(why)
    stage3 = make_stage3(workdir / "s3", init_marker="B")
    (workdir / "stage3").mkdir()
    shutil.copy(stage3, workdir / "stage3" / stage3.name)
    with btrfs_filesystem() as mnt:
        overrides = {"storage": {"backend": "dir", "btrfs_path": str(mnt)}}
        with running_daemon(workdir, overrides) as d:
            r = d.agctl("root", "create", "onbtrfs", "--stage3", stage3.name, "--backend", "btrfs")
            assert r.returncode == 0, r.stderr
            r = d.agctl("root", "create", "ondir", "--stage3", stage3.name)
            assert r.returncode == 0, r.stderr
            roots = {x["name"]: x for x in json.loads(d.agctl("--json", "roots").stdout)}
            assert roots["onbtrfs"]["backend"] == "btrfs" and roots["ondir"]["backend"] == "dir"
            assert (mnt / "onbtrfs" / "etc/gentoo-release").is_file()
            # Snapshots, clones and jobs follow the root to its backend.
            assert d.agctl("root", "snapshot", "onbtrfs", "s1").returncode == 0
            assert d.agctl("root", "clone", "onbtrfs", "copy", "--snapshot", "s1").returncode == 0
            assert (mnt / "copy" / "etc/gentoo-release").is_file()
            r = d.agctl("run", "copy", "--", "/bin/sh", "-c", "echo on-btrfs > /etc/x")
            assert r.returncode == 0, r.stderr
            assert (mnt / "copy/etc/x").read_text() == "on-btrfs\n"
            for name in ("copy", "onbtrfs", "ondir"):
                assert d.agctl("root", "delete", name).returncode == 0
            # A backend that is not configured is a clear refusal.
            r = d.agctl("root", "create", "nozfs", "--stage3", stage3.name, "--backend", "zfs")
            assert r.returncode == 7 and "zfs" in r.stderr
