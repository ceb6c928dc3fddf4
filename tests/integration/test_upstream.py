"""Inputs from upstream, end to end: a signed mirror over HTTP, a real daemon, real mounts.

The mirror is a local HTTP server on 127.0.0.1 serving a Gentoo-shaped
tree signed with throwaway keys (tests/helpers/mirror.py); the daemon
trusts only the test's release key. The stage3 is busybox-based (no Gentoo
stage3 can be downloaded here). Nothing goes beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from autogentoo.errors import AgError
from tests.helpers import mirror as mh
from tests.helpers.daemon import DaemonProc, running_daemon, start_daemon
from tests.helpers.stage3 import make_stage3

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for the daemon and mounts"),
]


@dataclass
class World:
    tmp: Path
    mirror: mh.Mirror
    keyring: Path
    fpr: str
    stage3: Path
    overrides: dict[str, Any]
    daemon: DaemonProc | None = None

    @property
    def d(self) -> DaemonProc:
        assert self.daemon is not None
        return self.daemon


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("upstream")
    with mh.keys(tmp) as k:
        fpr = k.make("Test Releng <releng@example.invalid>")
        other = k.make("Somebody Else <other@example.invalid>")
        keyring = k.export(fpr, tmp / "trusted.asc")
        tree = tmp / "mirror"
        stage3 = make_stage3(tmp / "s3")
        mh.add_stage3(tree, k, fpr, stage3, "amd64-openrc")
        mh.add_stage3(tree, k, fpr, stage3, "amd64-badsig", tamper_digests=True)
        mh.add_stage3(tree, k, fpr, stage3, "amd64-otherkey", digests_key=other)
        mh.add_stage3(tree, k, fpr, stage3, "amd64-mismatch", wrong_digest=True)
        mh.add_stage3(tree, k, fpr, stage3, "amd64-truncated")
        mh.add_snapshot(tree, k, fpr, mh.make_repo_tarball(tmp / "repo"))
        kernels = tmp / "kernel-mirror"
        mh.add_kernel(kernels, k, fpr, "6.1.99", tmp / "ksrc")
        with mh.serve(tree) as m, mh.serve(kernels) as km:
            overrides = {
                "kernel_source_dir": str(tmp / "src"),
                "upstream": {
                    # A dead mirror first: the daemon must go on to the next one.
                    "mirrors": [f"http://127.0.0.1:{mh.dead_port()}", m.url],
                    "kernel_mirrors": [km.url],
                    "keyring": str(keyring),
                    "kernel_keyring": str(keyring),
                    "keep_repo_snapshots": 2,
                },
            }
            yield World(tmp, m, keyring, fpr, stage3, overrides)


@pytest.fixture
def world(shared: World, tmp_path: Path) -> Iterator[World]:
    """The shared mirror, and a daemon of this test's own (its processes are the test's)."""
    with running_daemon(tmp_path / "d", shared.overrides) as d:
        yield replace(shared, daemon=d)


def _wait(d: DaemonProc, job: dict[str, Any]) -> dict[str, Any]:
    with d.client() as c:
        for _ in c.stream(f"/jobs/{job['id']}/log", {"follow": True}):
            pass
        final: dict[str, Any] = c.call("GET", f"/jobs/{job['id']}")
        return final


def _log(d: DaemonProc, job_id: int) -> str:
    with d.client() as c:
        return b"".join(c.stream(f"/jobs/{job_id}/log")).decode()


def _cache_files(w: World) -> set[str]:
    top = w.d.state_dir / "upstream"
    files = {str(p.relative_to(top)) for p in top.rglob("*") if p.is_file()}
    scratch = [p.name for p in (w.d.state_dir / "tmp").iterdir()]
    assert not scratch, f"scratch files left: {scratch}"
    return files


def _fetch_stage3(w: World, profile: str) -> dict[str, Any]:
    return _wait(w.d, w.d.call("POST", "/stage3/fetch", body={"profile": profile}))


# --- stage3 -----------------------------------------------------------------------


def test_good_stage3_is_fetched_verified_recorded_and_used(world: World) -> None:
    job = _fetch_stage3(world, "amd64-openrc")
    assert job["state"] == "succeeded", _log(world.d, job["id"])
    assert job["result"]["signer"] == world.fpr
    log = _log(world.d, job["id"])
    assert "trying the next one" in log  # the dead mirror was skipped
    assert ".asc: good signature" in log
    rows = world.d.call("GET", "/stage3")
    (row,) = [r for r in rows if r["profile"] == "amd64-openrc"]
    assert row["signer"] == world.fpr
    assert row["url"].startswith(world.mirror.url + "/releases/amd64/autobuilds/")
    assert row["digest"].startswith("sha512:") and row["published"] == mh.STAMP
    # Fetching again finds it in the cache.
    again = _fetch_stage3(world, "amd64-openrc")
    assert again["state"] == "succeeded"
    assert "already in the stage3 cache" in _log(world.d, again["id"])
    # `agctl root create NAME --stage3 amd64-openrc` sends stage3=amd64-openrc.
    created = _wait(
        world.d,
        world.d.call("POST", "/roots", body={"name": "fromprofile", "stage3": "amd64-openrc"}),
    )
    assert created["state"] == "succeeded", _log(world.d, created["id"])
    assert created["params"]["profile"] == "amd64-openrc"
    _wait(world.d, world.d.call("DELETE", "/roots/fromprofile"))


@pytest.mark.parametrize(
    ("profile", "code", "reason"),
    [
        ("amd64-badsig", "bad_signature", "bad signature"),
        ("amd64-otherkey", "bad_signature", "not in the trusted keyring"),
        ("amd64-mismatch", "digest_mismatch", "sha512 digest mismatch"),
        ("amd64-nosuch", "not_found", "knows no stage3 profile"),
    ],
)
def test_refused_stage3_leaves_nothing(world: World, profile: str, code: str, reason: str) -> None:
    before = _cache_files(world)
    job = _fetch_stage3(world, profile)
    assert job["state"] == "failed"
    assert job["error"]["code"] == code, job["error"]
    assert reason in job["error"]["message"], job["error"]
    assert _cache_files(world) == before
    assert not [r for r in world.d.call("GET", "/stage3") if r["profile"] == profile]


def test_truncated_download_is_resumed(world: World) -> None:
    path = f"/releases/amd64/autobuilds/{mh.STAMP}/stage3-amd64-truncated-{mh.STAMP}.tar.xz"
    size = (world.mirror.root / path.lstrip("/")).stat().st_size
    world.mirror.drop_once[path] = size // 3
    job = _fetch_stage3(world, "amd64-truncated")
    assert job["state"] == "succeeded", _log(world.d, job["id"])
    assert "resuming" in _log(world.d, job["id"])
    ranges = [r for p, r in world.mirror.requests if p == path]
    # Resumed from what had reached the disk: at most what the mirror sent
    # before dropping (the tail of it may still have been in flight).
    assert ranges[0] is None and ranges[1] is not None
    offset = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= size // 3


def test_unknown_profile_name_is_refused_before_any_job(world: World) -> None:
    with pytest.raises(AgError) as e:
        world.d.call("POST", "/stage3/fetch", body={"profile": "../etc"})
    assert e.value.code == "invalid_argument"


def test_mirror_down_is_unavailable_and_leaves_nothing(world: World) -> None:
    overrides = {
        "upstream": {
            "mirrors": [f"http://127.0.0.1:{mh.dead_port()}"],
            "keyring": str(world.keyring),
        }
    }
    with running_daemon(world.tmp / "down", overrides) as d:
        job = _wait(d, d.call("POST", "/stage3/fetch", body={"profile": "amd64-openrc"}))
        assert job["state"] == "failed"
        assert job["error"]["code"] == "unavailable", job["error"]
        assert "no mirror could be reached" in job["error"]["message"]
        assert not [p for p in (d.state_dir / "upstream").rglob("*") if p.is_file()]
        assert d.call("GET", "/stage3") == []


# --- kernel sources ------------------------------------------------------------------


def test_kernel_source_is_fetched_and_unpacked(world: World) -> None:
    job = _wait(world.d, world.d.call("POST", "/kernels/fetch", body={"version": "6.1.99"}))
    assert job["state"] == "succeeded", _log(world.d, job["id"])
    assert (world.tmp / "src" / "linux-6.1.99" / "Makefile").is_file()
    (row,) = world.d.call("GET", "/kernels/fetched")
    assert row["signer"] == world.fpr and row["digest"].startswith("sha512:")
    missing = _wait(world.d, world.d.call("POST", "/kernels/fetch", body={"version": "6.2"}))
    assert missing["error"]["code"] == "invalid_argument"  # not in the signed sha256sums
    assert not (world.tmp / "src" / "linux-6.2").exists()


# --- repository snapshots --------------------------------------------------------------


def _make_root(d: DaemonProc, name: str, stage3: Path) -> None:
    with d.client() as c, open(stage3, "rb") as f:
        up = c.upload("/uploads", f, query={"filename": stage3.name})
        job = c.call("POST", "/roots", body={"name": name, "upload": up["id"]})
    assert _wait(d, job)["state"] == "succeeded"


def _run(d: DaemonProc, root: str, script: str) -> dict[str, Any]:
    job: dict[str, Any] = d.call(
        "POST", f"/roots/{root}/run", body={"argv": ["/bin/sh", "-c", script]}
    )
    return job


# Each job marks itself in the shared distfiles, then waits for the other:
# both can only finish if they run at the same time.
_BOTH = """
set -e
grep -q ' /var/db/repos/gentoo ro,.* - squashfs ' /proc/self/mountinfo
test "$(cat /var/db/repos/gentoo/profiles/repo_name)" = gentoo
test -f /var/db/repos/gentoo/app-misc/hello/hello-1.ebuild
if touch /var/db/repos/gentoo/x 2>/tmp/err; then echo WROTE; exit 1; fi
grep -q 'Read-only file system' /tmp/err
touch /var/cache/distfiles/{me}
i=0
until [ -e /var/cache/distfiles/{other} ]; do i=$((i+1)); [ $i -lt 600 ] || exit 9; sleep 0.1; done
echo ok-{me}
"""


def test_snapshot_is_mounted_read_only_in_two_concurrent_jobs(world: World) -> None:
    d = world.d
    job = _wait(d, d.call("POST", "/repos/fetch"))
    assert job["state"] == "succeeded", _log(d, job["id"])
    name = job["result"]["name"]
    assert name == "gentoo-20240101"
    (row,) = [r for r in d.call("GET", "/repos") if r["name"] == name]
    assert row["active"] and row["signer"] == world.fpr
    image = d.state_dir / "upstream" / "repos" / f"{name}.sqfs"
    assert image.is_file()

    for r in ("repo-a", "repo-b"):
        _make_root(d, r, world.stage3)
    try:
        a = _run(d, "repo-a", _BOTH.format(me="a", other="b"))
        b = _run(d, "repo-b", _BOTH.format(me="b", other="a"))
        ra, rb = _wait(d, a), _wait(d, b)
        assert ra["state"] == "succeeded", _log(d, a["id"])
        assert rb["state"] == "succeeded", _log(d, b["id"])
        assert "ok-a" in _log(d, a["id"]) and "ok-b" in _log(d, b["id"])
        # Nothing of the jobs is left on the host: no mount, no loop device
        # (the autouse leak check also looks, after the test).
        _until_no_loop(image)
        assert not [line for line in _mountinfo() if "squashfs" in line and name in line]
        # Any job but a sync sees the image, read-only.
        plain = _wait(d, _run(d, "repo-a", "touch /var/db/repos/gentoo/synced"))
        assert plain["state"] == "failed"
    finally:
        for r in ("repo-a", "repo-b"):
            _wait(d, d.call("DELETE", f"/roots/{r}"))


def test_repo_use_and_delete(world: World) -> None:
    d = world.d
    assert _wait(d, d.call("POST", "/repos/fetch"))["state"] == "succeeded"
    names = [r["name"] for r in d.call("GET", "/repos")]
    assert names
    with pytest.raises(AgError) as e:
        d.call("DELETE", f"/repos/{names[0]}")
    assert e.value.code == "conflict"
    with pytest.raises(AgError) as e:
        d.call("POST", "/repos/nosuch/use")
    assert e.value.code == "not_found"
    assert d.call("POST", f"/repos/{names[0]}/use")["active"] is True


def test_loop_device_goes_when_the_daemon_is_killed(world: World) -> None:
    tmp = world.tmp / "killed"
    overrides = {"upstream": {"mirrors": [world.mirror.url], "keyring": str(world.keyring)}}
    d = start_daemon(tmp, overrides)
    try:
        job = _wait(d, d.call("POST", "/repos/fetch"))
        assert job["state"] == "succeeded", _log(d, job["id"])
        image = d.state_dir / "upstream" / "repos" / f"{job['result']['name']}.sqfs"
        _make_root(d, "victim", world.stage3)
        running = _run(d, "victim", "echo mounted; exec sleep 600")
        deadline = time.monotonic() + 60
        while "mounted" not in _log(d, running["id"]):
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.05)
        assert _loops_for(image), "the job's loop device is not attached"
        d.stop(signal.SIGKILL)
        _until_no_loop(image)
    finally:
        d.stop(signal.SIGKILL)
        from autogentoo.daemon.mounts import cleanup_under_sync

        cleanup_under_sync(str(tmp), include_root=False)


def test_agctl_commands(world: World) -> None:
    """The agctl subcommands, through register(), against the real daemon."""
    from autogentoo.client import main as agctl
    from autogentoo.client.upstream_cmds import register

    parser = argparse.ArgumentParser()
    common = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub, common)
    with world.d.client() as c:
        for argv in (["stage3", "list"], ["repo", "list"], ["kernel", "fetched"]):
            args = parser.parse_args(["--json", *argv])
            args.detach = False
            assert args.func(args, c) == 0
        args = parser.parse_args(["-q", "stage3", "fetch", "amd64-nosuch"])
        args.detach = False
        assert args.func(args, c) == 3  # not found
    assert agctl.EXIT_INTERRUPTED == 130


# --- helpers ---------------------------------------------------------------------


def _mountinfo() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


def _loops_for(image: Path) -> list[str]:
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().strip().removesuffix(" (deleted)") == str(image):
                found.append(backing.parent.parent.name)
        except OSError:
            continue
    return found


def _until_no_loop(image: Path) -> None:
    # Namespace teardown and loop autoclear are asynchronous in the kernel:
    # wait for the state, with a generous bound only against hanging.
    deadline = time.monotonic() + 30
    while _loops_for(image):
        assert time.monotonic() < deadline, f"loop devices left for {image}: {_loops_for(image)}"
        time.sleep(0.05)
