"""SIGKILL the daemon at each step of import, job and pack; restart; nothing is lost.

The daemon pauses at a named point (autogentoo/daemon/faults.py) when the test
asks for it, writes a marker file, and waits: the test then kills it exactly
there. After a restart: no mount left in the host namespace, no process of
the dead daemon alive, the job marked interrupted, a half import gone,
earlier roots untouched, artefacts consistent (no row without its files, no
files without a row), and the same operation succeeds when run again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import DaemonProc, running_daemon, start_daemon
from tests.helpers.stage3 import build_tree, make_stage3, make_tarball

pytestmark = pytest.mark.integration


# --- helpers other proof tests share ---------------------------------------------


def wait_job(d: DaemonProc, job: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        row: dict[str, Any] = d.call("GET", f"/jobs/{job['id']}")
        if row["state"] not in ("queued", "running"):
            return row
        assert time.monotonic() < deadline, f"job {job['id']} still {row['state']}"
        time.sleep(0.02)


def create_root(d: DaemonProc, name: str, stage3: Path) -> dict[str, Any]:
    dest = d.config_path.parent / "stage3" / stage3.name
    if not dest.exists():
        shutil.copy(stage3, dest)
    job = wait_job(d, d.call("POST", "/roots", body={"name": name, "stage3": stage3.name}))
    assert job["state"] == "succeeded", job
    return job


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == str(path) or p.startswith(f"{path}/")]


def descendants(pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of every process below pid."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        starts[int(entry)] = fields[19]
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add((child, starts[child]))
            todo.append(child)
    return out


def alive(procs: set[tuple[int, str]]) -> list[str]:
    out = []
    for pid, start in procs:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields[19] == start and fields[0] != "Z":
            out.append(f"{pid}: {argv.decode(errors='replace')[:120]}")
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def tree_digest(path: Path) -> str:
    """Names, types, modes, owners and contents of a tree, links not followed."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(f"{p.relative_to(path)} {st.st_mode:o} {st.st_uid} {st.st_gid}\n".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def check_artifacts(d: DaemonProc) -> list[dict[str, Any]]:
    """No artefact row without its files, no directory in the store without a row."""
    rows: list[dict[str, Any]] = d.call("GET", "/artifacts", query={"limit": 1000})
    store = d.state_dir / "artifacts"
    for a in rows:
        for f in a["files"]:
            assert (store / a["id"] / f).is_file(), f"artefact {a['id']} lost {f}"
    on_disk = sorted(p.name for p in store.iterdir())
    assert on_disk == sorted(a["id"] for a in rows), on_disk
    return rows


@pytest.fixture(scope="module")
def stage3() -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="agt-s3c-", dir="/tmp"))
    os.chmod(work, 0o755)
    try:
        tarball = make_stage3(work, init_marker="CRASH")
        os.chmod(tarball, 0o644)
        yield tarball
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def big_stage3() -> Iterator[Path]:
    """An uncompressed stage3 large enough that tar is still writing when the daemon dies."""
    work = Path(tempfile.mkdtemp(prefix="agt-s3b-", dir="/tmp"))
    os.chmod(work, 0o755)
    try:
        tree = build_tree(work / "tree")
        for i in range(4):
            with open(tree / f"usr/lib/blob{i}", "wb") as f:
                for _ in range(128):
                    f.write(os.urandom(1 << 20))
        tarball = make_tarball(tree, work / "stage3-big.tar", compression=None)
        shutil.rmtree(tree)
        yield tarball
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the crash cases ---------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    point: str
    # Starts the operation; returns the job row.
    start: Callable[[DaemonProc, Path, Path], dict[str, Any]]
    # What a second run looks like once the daemon is back.
    again: Callable[[DaemonProc, Path, Path], None]
    # Whether the operation makes a new root (which must be gone after the crash).
    new_root: bool = False


def _start_import(d: DaemonProc, tarball: Path) -> dict[str, Any]:
    dest = d.config_path.parent / "stage3" / tarball.name
    if not dest.exists():
        shutil.copy(tarball, dest)
    job: dict[str, Any] = d.call("POST", "/roots", body={"name": "new", "stage3": tarball.name})
    return job


def _import(d: DaemonProc, stage3: Path, big: Path) -> dict[str, Any]:
    return _start_import(d, stage3)


def _import_big(d: DaemonProc, stage3: Path, big: Path) -> dict[str, Any]:
    return _start_import(d, big)


def _import_again(d: DaemonProc, stage3: Path, big: Path) -> None:
    create_root(d, "new", stage3)
    assert d.agctl("run", "new", "--", "/bin/true").returncode == 0


def _run(d: DaemonProc, stage3: Path, big: Path) -> dict[str, Any]:
    job: dict[str, Any] = d.call(
        "POST", "/roots/g0/run", body={"argv": ["/bin/sh", "-c", "echo started; sleep 300"]}
    )
    return job


def _run_again(d: DaemonProc, stage3: Path, big: Path) -> None:
    r = d.agctl("run", "g0", "--", "/bin/sh", "-c", "echo again")
    assert r.returncode == 0 and r.stdout == "again\n", r.stderr


def _pack(d: DaemonProc, stage3: Path, big: Path) -> dict[str, Any]:
    job: dict[str, Any] = d.call("POST", "/roots/g0/pack", body={"compress": "gzip"})
    return job


def _pack_again(d: DaemonProc, stage3: Path, big: Path) -> None:
    job = wait_job(d, _pack(d, stage3, big))
    assert job["state"] == "succeeded", job
    arts = check_artifacts(d)
    assert job["result"]["artifact"] in {a["id"] for a in arts}
    art = next(a for a in arts if a["id"] == job["result"]["artifact"])
    got = b"".join(d.client().stream(f"/artifacts/{art['id']}/content"))
    # A layered initramfs is its members back to back; its digest is over
    # the members' digests, each of which must match its bytes.
    offset, digests = 0, []
    for m in art["members"]:
        part = got[offset : offset + m["size"]]
        assert hashlib.sha256(part).hexdigest() == m["sha256"]
        digests.append(m["sha256"])
        offset += m["size"]
    assert offset == len(got)
    assert hashlib.sha256("".join(digests).encode()).hexdigest() == art["sha256"]


CASES = [
    Case("import.reserved", _import, _import_again, new_root=True),
    Case("import.extracting", _import_big, _import_again, new_root=True),
    Case("import.extracted", _import, _import_again, new_root=True),
    Case("job.running", _run, _run_again),
    Case("job.spawned", _run, _run_again),
    Case("pack.planned", _pack, _pack_again),
    Case("pack.member_written", _pack, _pack_again),
    Case("pack.before_register", _pack, _pack_again),
    Case("artifact.renamed", _pack, _pack_again),
]


def wait_marker(d: DaemonProc, marker: Path, point: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert d.proc.poll() is None, f"the daemon exited before {point}:\n{d.log()}"
        assert time.monotonic() < deadline, f"the daemon never reached {point}:\n{d.log()}"
        time.sleep(0.01)
    assert marker.read_text() == point


@pytest.mark.parametrize("case", CASES, ids=[c.point for c in CASES])
def test_sigkill_at_point_then_restart(
    case: Case, workdir: Path, stage3: Path, big_stage3: Path
) -> None:
    # An earlier root, which no crash may touch.
    with running_daemon(workdir) as d0:
        create_root(d0, "g0", stage3)
        # One job first, so the mount points a job makes in its root exist.
        assert d0.agctl("run", "g0", "--", "/bin/true").returncode == 0
    roots_dir = workdir / "state" / "roots"
    g0_before = tree_digest(roots_dir / "g0")
    mounts_before = mounts_under(workdir)

    marker = workdir / "fault-reached"
    d = start_daemon(
        workdir,
        env={"AUTOGENTOO_TEST_FAULTS": case.point, "AUTOGENTOO_TEST_FAULT_MARKER": str(marker)},
    )
    try:
        job = case.start(d, stage3, big_stage3)
        wait_marker(d, marker, case.point)
        procs = descendants(d.proc.pid)
        if case.point == "import.extracting":
            # Stop tar mid-write: only the daemon's death may end it now, so a
            # tar that outlives the daemon (and writes into the half root while
            # the next daemon removes it) fails the test whatever the timing.
            deadline = time.monotonic() + 30
            while not (tars := [pid for pid, _ in procs if _comm(pid) == "tar"]):
                assert time.monotonic() < deadline, alive(procs)
                time.sleep(0.01)
                procs = descendants(d.proc.pid)
            for pid in tars:
                os.kill(pid, signal.SIGSTOP)
        d.stop(signal.SIGKILL)
    finally:
        d.stop(signal.SIGKILL)

    # Nothing of the dead daemon lives on: fork server, job namespaces, tar.
    deadline = time.monotonic() + 10
    while left := alive(procs):
        if time.monotonic() > deadline:
            for pid, _ in procs:  # ours: leave nothing behind even on failure
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            pytest.fail(f"processes outlived the daemon: {left}")
        time.sleep(0.05)
    assert mounts_under(workdir) == mounts_before

    with running_daemon(workdir) as d2:
        row = d2.call("GET", f"/jobs/{job['id']}")
        assert row["state"] == "interrupted", row
        roots = {r["name"]: r["state"] for r in d2.call("GET", "/roots")}
        assert roots == {"g0": "ready"}, roots
        assert sorted(p.name for p in roots_dir.iterdir()) == ["g0"]
        assert tree_digest(roots_dir / "g0") == g0_before
        check_artifacts(d2)
        assert os.listdir(workdir / "state" / "tmp") == []
        assert not list((workdir / "state" / "uploads").iterdir())
        case.again(d2, stage3, big_stage3)
        assert tree_digest(roots_dir / "g0") == g0_before
        check_artifacts(d2)
    assert mounts_under(workdir) == mounts_before


def test_fault_points_cost_nothing_when_unset() -> None:
    """Without the test variables `point` returns at once and names no marker."""
    import asyncio

    from autogentoo.daemon import faults

    assert not faults._POINTS
    asyncio.run(faults.point("import.reserved"))
    faults.point_sync("artifact.renamed")
