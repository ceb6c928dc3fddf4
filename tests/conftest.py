"""Suite-wide fixtures: the interpreter to start daemons with, and a leak check.

Every test is checked for what it leaves behind in the host: mount points,
loop devices, zfs pools (when a zfs-fuse runs) and processes descended from
pytest. The check also runs once for the whole session, for what module- and
session-scoped fixtures leave. Unmounting and reaping are asynchronous, so
each check polls for a short grace period before it fails.

Mounts, loop devices and pools are host-wide, so a concurrent test run on
the same machine can show up here: objects under another pytest session's
basetemp are always taken as theirs, and while another pytest runs, only
host-wide objects under this session's basetemp are counted (CI runs alone,
so there the check is complete). Leaked mounts and loop devices under this
session's basetemp are undone after being reported: pytest later deletes old
basetemps recursively, and would follow a leaked bind mount into the host.
Leaked processes are reported, not killed (one may be shared with another
run, like the tests' zfs-fuse).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Fixtures shared across test modules (users, sshd) live with their helpers.
pytest_plugins = ["tests.helpers.users", "tests.helpers.sshd"]

ROOT = Path(__file__).resolve().parent.parent
# Seconds a check waits for asynchronous unmounts and reaping before failing.
GRACE = float(os.environ.get("AUTOGENTOO_TEST_LEAK_GRACE", "2"))
_BASETEMP = pytest.StashKey[Path]()
_SESSION_SNAPSHOT = pytest.StashKey["Snapshot"]()


def pytest_configure(config: pytest.Config) -> None:
    # Tests import the checkout (the repo root is on sys.path); so must the
    # daemons and agctl they start as root with the venv's python.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = f"{ROOT}:{old}" if old else str(ROOT)


def pytest_report_header(config: pytest.Config) -> str:
    installed = Path(sysconfig.get_paths()["purelib"]) / "autogentoo"

    def sources(top: Path) -> dict[Path, bytes]:
        return {p.relative_to(top): p.read_bytes() for p in top.rglob("*.py")}

    if not installed.is_dir():
        return f"autogentoo is not installed in {sys.prefix}: run scripts/setup.sh"
    if sources(installed) != sources(ROOT / "autogentoo"):
        return (
            f"WARNING: the autogentoo installed in {sys.prefix} differs from {ROOT}; "
            "processes run as other users import the installed one (run scripts/setup.sh)"
        )
    return f"autogentoo: installed copy matches {ROOT}"


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A temp dir under /tmp that other users can traverse.

    pytest's tmp_path sits under a 0700 directory, so a daemon socket or a
    stage3 there is out of reach of the throwaway users the tests act as.
    """
    path = Path(tempfile.mkdtemp(prefix="agt-w-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def venv_python() -> Path:
    """The interpreter tests start `-m autogentoo.daemon` and agctl with."""
    return Path(sys.executable)


# --- the leak check ------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    mounts: frozenset[tuple[int, str]]  # (mount id, mount point)
    loops: frozenset[tuple[str, str]]  # (device, backing file)
    procs: frozenset[tuple[int, str]]  # (pid, start time): pids get reused
    pools: frozenset[str]


_OCTAL = re.compile(r"\\([0-7]{3})")


def _mounts() -> frozenset[tuple[int, str]]:
    out = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        out.add((int(fields[0]), point))
    return frozenset(out)


def _loops() -> frozenset[tuple[str, str]]:
    out = set()
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):  # detached meanwhile
            out.add((f"/dev/{backing.parent.parent.name}", backing.read_text().strip()))
    return frozenset(out)


def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, start time) for every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # comm (field 2) may hold spaces and parentheses: split after it.
            fields = stat.rpartition(")")[2].split()
            table[int(entry)] = (int(fields[1]), fields[0], fields[19])
    return table


def _descendants(table: dict[int, tuple[int, str, str]]) -> frozenset[tuple[int, str]]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add((child, table[child][2]))
            todo.append(child)
    return frozenset(out)


def _pools(table: dict[int, tuple[int, str, str]]) -> frozenset[str]:
    # Only when a zfs-fuse runs: otherwise zpool has nothing to ask and is slow.
    if shutil.which("zpool") is None or not any(_comm(pid) == "zfs-fuse" for pid in table):
        return frozenset()
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        res = subprocess.run(
            ["zpool", "list", "-H", "-o", "name"],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        )
        if res.returncode == 0:
            return frozenset(res.stdout.split())
    return frozenset()


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _cmdline(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    return " ".join(a.decode(errors="replace") for a in argv if a)[:200] or f"[{_comm(pid)}]"


def snapshot() -> Snapshot:
    table = _proc_table()
    return Snapshot(_mounts(), _loops(), _descendants(table), _pools(table))


def _theirs(path: str, basetemp: Path | None) -> bool:
    """Whether path lies in another pytest session's basetemp."""
    if basetemp is None or not basetemp.parent.name.startswith("pytest-of-"):
        return False
    p = Path(path)
    return p.is_relative_to(basetemp.parent) and not p.is_relative_to(basetemp)


def _other_pytest_running() -> bool:
    """Whether a pytest that is not us, our ancestor or our descendant runs."""
    table = _proc_table()
    related = {pid for pid, _ in _descendants(table)}
    pid = os.getpid()
    while pid in table and pid not in related:
        related.add(pid)
        pid = table[pid][0]
    for other in table.keys() - related:
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{other}/cmdline").read_bytes().split(b"\0")
            if any(Path(a.decode(errors="replace")).name in ("pytest", "py.test") for a in argv):
                return True
    return False


def _leaks(before: Snapshot, basetemp: Path | None, shared: bool) -> tuple[list[str], Snapshot]:
    """What is new since `before`; `shared`: another test run may own host-wide objects."""

    def counts(path: str) -> bool:
        if _theirs(path, basetemp):
            return False
        return not shared or (basetemp is not None and Path(path).is_relative_to(basetemp))

    now = snapshot()
    found = []
    for mid, point in sorted(now.mounts - before.mounts, key=lambda m: m[1]):
        if counts(point):
            found.append(f"mount {point} (mount id {mid})")
    for dev, backing in sorted(now.loops - before.loops):
        if counts(backing):
            found.append(f"loop device {dev} -> {backing}")
    for pid, _ in sorted(now.procs - before.procs):
        state = "zombie, never waited for" if _state(pid) == "Z" else "running"
        found.append(f"process {pid} ({state}): {_cmdline(pid)}")
    if not shared:
        found += [f"zfs pool {pool}" for pool in sorted(now.pools - before.pools)]
    return found, now


def _state(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    return "?"


def _undo_ours(before: Snapshot, now: Snapshot, basetemp: Path | None) -> None:
    """Undo leaked mounts and loops in our basetemp; reap our leaked zombies."""
    if basetemp is not None:
        new_mounts = [p for _, p in now.mounts - before.mounts if Path(p).is_relative_to(basetemp)]
        for point in sorted(new_mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        for dev, backing in now.loops - before.loops:
            if Path(backing).is_relative_to(basetemp):
                subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
    for pid, _ in now.procs - before.procs:
        if _state(pid) == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def check_leaks(before: Snapshot, basetemp: Path | None) -> list[str]:
    deadline = time.monotonic() + GRACE
    shared = False
    while True:
        found, now = _leaks(before, basetemp, shared)
        if found and not shared and _other_pytest_running():
            shared = True
            continue
        if not found or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if found:
        _undo_ours(before, now, basetemp)
    return found


def pytest_sessionstart(session: pytest.Session) -> None:
    session.stash[_SESSION_SNAPSHOT] = snapshot()


def pytest_sessionfinish(session: pytest.Session) -> None:
    before = session.stash.get(_SESSION_SNAPSHOT, None)
    if before is None:
        return
    found = check_leaks(before, session.stash.get(_BASETEMP, None))
    if found:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = "the test session left behind:\n  " + "\n  ".join(found)
        if reporter is not None:
            reporter.write_line(f"LEAK: {text}", red=True, bold=True)
        else:
            print(f"LEAK: {text}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def no_leaks(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Fail the test if it leaves mounts, loop devices, processes or zfs pools."""
    basetemp = tmp_path_factory.getbasetemp()
    request.session.stash[_BASETEMP] = basetemp
    before = snapshot()
    yield
    found = check_leaks(before, basetemp)
    if found:
        pytest.fail("test left behind:\n  " + "\n  ".join(found), pytrace=False)
