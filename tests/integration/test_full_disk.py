"""A full disk under the daemon's state: clear no_space errors, nothing half registered,
and the daemon still serving.

test_roots_jobs.py covers a stage3 larger than the disk and test_pack_api.py a
pack that does not fit; this covers what they do not: an upload that fills
the disk, a job whose log cannot be written (and a state database that
cannot grow meanwhile), and recovery once space is back.

Decision for the log: a job whose output cannot be written fails with
`no_space` (its log would be incomplete); the daemon logs the loss once to
its own log (stderr or the journal, not the full disk), still records the
job's end, releases the root and goes on serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.daemon import DaemonProc, start_daemon
from tests.helpers.stage3 import make_stage3
from tests.integration.test_crashes import create_root, wait_job
from tests.integration.test_fuzz_api import check_reply, request

pytestmark = pytest.mark.integration


@pytest.fixture
def small_fs() -> Iterator[Path]:
    """A 24 MiB ext4 on a loop device: the daemon's state_dir lives on it."""
    work = Path(tempfile.mkdtemp(prefix="agt-fd-", dir="/tmp"))
    os.chmod(work, 0o755)
    img, mnt = work / "small.img", work / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "24M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        yield work
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        shutil.rmtree(work, ignore_errors=True)


def fill(mnt: Path, leave: int = 0) -> Path:
    filler = mnt / "filler"
    free = shutil.disk_usage(mnt).free - leave
    # Others write meanwhile (the daemon, a job): a failure here is filled below.
    subprocess.run(["fallocate", "-l", str(max(free, 4096)), str(filler)], check=False)
    # fallocate may leave a few blocks; take them too (all of them when leave is 0).
    if leave:
        return filler
    with open(mnt / "filler2", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    return filler


def unfill(mnt: Path) -> None:
    for name in ("filler", "filler2"):
        (mnt / name).unlink(missing_ok=True)


@pytest.fixture
def daemon(small_fs: Path) -> Iterator[DaemonProc]:
    mnt = small_fs / "mnt"
    d = start_daemon(
        small_fs / "d", {"state_dir": str(mnt / "state"), "storage": {"backend": "dir"}}
    )
    try:
        d.call("GET", "/status")
        yield d
    finally:
        unfill(mnt)
        assert d.stop() == 0, d.log()[-4000:]


def test_upload_that_fills_the_disk(daemon: DaemonProc, small_fs: Path) -> None:
    mnt = small_fs / "mnt"
    fill(mnt, leave=2 << 20)
    reply = request(
        daemon.socket,
        "PUT",
        "/v1/uploads?filename=stage3.tar.xz",
        os.urandom(8 << 20),
        "application/octet-stream",
    )
    check_reply(reply, "upload on a full disk")
    assert reply.status == 507 and reply.json()["code"] == "no_space", reply
    assert daemon.call("GET", "/uploads") == []
    assert list((mnt / "state" / "uploads").iterdir()) == []
    assert daemon.call("GET", "/status")["api"] == "v1"
    unfill(mnt)
    reply = request(
        daemon.socket, "PUT", "/v1/uploads?filename=ok", b"x" * 1024, "application/octet-stream"
    )
    assert reply.status == 200 and reply.json()["size"] == 1024


def test_job_log_on_a_full_disk(daemon: DaemonProc, small_fs: Path) -> None:
    mnt = small_fs / "mnt"
    stage3 = make_stage3(small_fs / "s3")
    create_root(daemon, "fd", stage3)
    job = daemon.call(
        "POST",
        "/roots/fd/run",
        body={"argv": ["/bin/sh", "-c", "echo started; sleep 2; yes line | head -c 4000000"]},
    )
    deadline = time.monotonic() + 30
    while b"started" not in b"".join(daemon.client().stream(f"/jobs/{job['id']}/log")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    fill(mnt)  # while the job sleeps: its output, and its row's update, find no room
    deadline = time.monotonic() + 60
    while "no space left for job log" not in daemon.log() or (
        daemon.call("GET", "/status")["jobs"]["running"] != 0
    ):
        assert time.monotonic() < deadline, daemon.log()[-3000:]
        time.sleep(0.1)
    # The job has ended and the daemon serves; its row is written once there is room.
    assert daemon.call("GET", "/roots")[0]["name"] == "fd"
    unfill(mnt)
    row = wait_job(daemon, job)
    assert row["state"] == "failed", row
    assert row["error"]["code"] == "no_space", (row["error"], row["returncode"])
    # The root was not left locked, and with space back all is well.
    r = daemon.agctl("run", "fd", "--", "/bin/sh", "-c", "echo back")
    assert r.returncode == 0 and r.stdout == "back\n", r.stderr


def test_import_into_a_full_disk_registers_nothing(daemon: DaemonProc, small_fs: Path) -> None:
    mnt = small_fs / "mnt"
    stage3 = make_stage3(small_fs / "s3")
    shutil.copy(stage3, daemon.config_path.parent / "stage3" / stage3.name)
    fill(mnt, leave=256 << 10)
    reply = request(
        daemon.socket,
        "POST",
        "/v1/roots",
        json.dumps({"name": "nf", "stage3": stage3.name}).encode(),
    )
    check_reply(reply, "import on a full disk")
    if reply.status == 200:  # the row fitted: then the job fails
        row = wait_job(daemon, reply.json())
        assert row["state"] == "failed" and row["error"]["code"] == "no_space", row
    else:  # even the row did not fit
        assert reply.json()["code"] == "no_space", reply
    assert daemon.call("GET", "/roots") == []
    assert list((mnt / "state" / "roots").iterdir()) == []
    unfill(mnt)
    create_root(daemon, "nf", stage3)
