"""Every place the daemon resolves a path inside a root, through the real daemon, against
symlinks out of the root, `..`, and a directory swapped for a symlink while it works.

test_pathsafe.py proves the resolver (pathsafe) on its own; this proves the
daemon uses it everywhere: the script written into the root, make.conf in
bootstrap, resolv.conf and the cache bind targets in jobs, and pack-root's
walk. A canary directory and file on the host must never be written, read
into an artefact, or mounted over.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.daemon import DaemonProc, running_daemon
from tests.helpers.stage3 import make_stage3
from tests.integration.test_crashes import create_root, mounts_under, wait_job

pytestmark = pytest.mark.integration

SECRET = b"host-secret-4f1c9a\n"


@pytest.fixture
def arena() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="agt-ps-", dir="/tmp"))
    os.chmod(path, 0o755)
    canary = path / "canary"
    canary.mkdir()
    (canary / "secret").write_bytes(SECRET)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(arena: Path) -> Iterator[DaemonProc]:
    with running_daemon(arena / "d") as d:
        create_root(d, "ps", make_stage3(arena / "s3"))
        yield d


def root_of(d: DaemonProc) -> Path:
    return d.state_dir / "roots" / "ps"


def canary_untouched(arena: Path) -> None:
    canary = arena / "canary"
    assert sorted(os.listdir(canary)) == ["secret"], os.listdir(canary)
    assert (canary / "secret").read_bytes() == SECRET
    assert mounts_under(canary) == []


def escape_links(arena: Path) -> list[str]:
    """Ways a planted link may try to reach the canary from inside the root."""
    canary = arena / "canary"
    return [str(canary), "../" * 30 + str(canary).lstrip("/")]


@pytest.mark.parametrize("how", [0, 1], ids=["absolute", "dotdot"])
def test_script_dir_symlinked_out(daemon: DaemonProc, arena: Path, how: int) -> None:
    root = root_of(daemon)
    shutil.rmtree(root / "var/tmp/autogentoo", ignore_errors=True)
    (root / "var/tmp/autogentoo").symlink_to(escape_links(arena)[how])
    r = daemon.agctl("run", "ps", "--script", "/dev/stdin", input=b"echo hi\n")
    del r  # may fail or succeed: what matters is where it wrote
    job = daemon.call("GET", "/jobs", query={"limit": 1})[0]
    wait_job(daemon, job)
    canary_untouched(arena)


def test_make_conf_symlinked_out(daemon: DaemonProc, arena: Path) -> None:
    root = root_of(daemon)
    (root / "etc/portage/make.conf").unlink()
    (root / "etc/portage/make.conf").symlink_to(arena / "canary" / "secret")
    wait_job(daemon, daemon.call("POST", "/roots/ps/bootstrap"))
    canary_untouched(arena)
    shutil.rmtree(root / "etc/portage")
    (root / "etc/portage").symlink_to("../" * 30 + str(arena / "canary").lstrip("/"))
    wait_job(daemon, daemon.call("POST", "/roots/ps/bootstrap"))
    canary_untouched(arena)


def test_resolv_conf_and_bind_targets_symlinked_out(daemon: DaemonProc, arena: Path) -> None:
    root = root_of(daemon)
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").symlink_to(arena / "canary" / "secret")
    for target in ("var/cache/distfiles", "var/cache/binpkgs"):
        shutil.rmtree(root / target)
        (root / target).symlink_to("../" * 30 + str(arena / "canary").lstrip("/"))
    before = mounts_under(arena)
    r = daemon.agctl("run", "ps", "--", "/bin/sh", "-c", "cat /etc/resolv.conf >/dev/null; ls /")
    del r
    canary_untouched(arena)
    assert mounts_under(arena) == before


def test_pack_walk_does_not_follow_links_out(daemon: DaemonProc, arena: Path) -> None:
    root = root_of(daemon)
    (root / "etc/evil").symlink_to(arena / "canary" / "secret")
    (root / "etc/evil-dir").symlink_to("../" * 30 + str(arena / "canary").lstrip("/"))
    os.link(arena / "canary" / "secret", root / "etc/hardlinked") if (
        os.stat(arena / "canary").st_dev == os.stat(root).st_dev
    ) else None
    job = wait_job(daemon, daemon.call("POST", "/roots/ps/pack", body={"layered": False}))
    assert job["state"] == "succeeded", job
    data = b"".join(daemon.client().stream(f"/artifacts/{job['result']['artifact']}/content"))
    archive = gzip.decompress(data)
    # The links are archived as links (their target text), never as the file.
    assert str(arena / "canary" / "secret").encode() in archive
    if not (root / "etc/hardlinked").exists():
        assert SECRET not in archive
    canary_untouched(arena)


def test_swapped_symlink_race_while_writing_scripts(daemon: DaemonProc, arena: Path) -> None:
    """A thread swaps the script directory for a link out of the root, in a loop,
    while the daemon writes one script after another into it."""
    root = root_of(daemon)
    target = root / "var/tmp/autogentoo"
    stop = threading.Event()
    swaps = [0]

    def swapper() -> None:
        links = escape_links(arena)
        while not stop.is_set():
            try:
                if target.is_symlink():
                    target.unlink()
                    target.mkdir()
                else:
                    shutil.rmtree(target, ignore_errors=True)
                    target.symlink_to(links[swaps[0] % 2])
                swaps[0] += 1
            except OSError:
                pass  # the daemon made or removed something meanwhile: go on
            time.sleep(0.0002)

    t = threading.Thread(target=swapper)
    t.start()
    try:
        for _ in range(15):
            daemon.call("POST", "/roots/ps/run", body={"script": "echo x\n"})
        deadline = time.monotonic() + 120
        while any(
            j["state"] in ("queued", "running")
            for j in daemon.call("GET", "/jobs", query={"limit": 50})
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        stop.set()
        t.join()
    assert swaps[0] > 10
    canary_untouched(arena)
    assert daemon.call("GET", "/status")["api"] == "v1"
