"""The suite's leak check (tests/conftest.py) catches what it promises to.

An inner pytest run, with a copy of the conftest, runs tests that leak a
mount, a loop device, a process and a zombie, and a module fixture that
leaks past the session; the outer test checks the report, that the inner
check undid the mount and the loop device, and kills the leaked processes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

INNER = """
import os
import subprocess
import time
from pathlib import Path

import pytest

PIDS = Path(os.environ["LEAK_PIDS"])


def _record(proc):
    with PIDS.open("a") as f:
        f.write(f"{proc.pid}\\n")


@pytest.fixture(scope="module")
def module_daemon():
    proc = subprocess.Popen(["sleep", "60"])
    _record(proc)
    yield proc  # never stopped: the session check must see it


def test_clean(tmp_path):
    subprocess.run(["true"], check=True)
    (tmp_path / "f").write_text("x")


def test_waited_child_is_fine():
    proc = subprocess.Popen(["sleep", "0.2"])
    time.sleep(0.5)
    proc.wait()


def test_leaks_mount(tmp_path):
    (tmp_path / "m").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "leaky", str(tmp_path / "m")], check=True)


def test_leaks_loop(tmp_path):
    img = tmp_path / "img"
    img.write_bytes(b"\\0" * (1 << 20))
    subprocess.run(["losetup", "-f", str(img)], check=True)


def test_leaks_process():
    _record(subprocess.Popen(["sleep", "60"]))


def test_leaks_zombie():
    proc = subprocess.Popen(["true"])
    _record(proc)
    time.sleep(0.3)
    proc.returncode = 0  # keeps Popen.__del__ from reaping it later


def test_uses_module_fixture(module_daemon):
    assert module_daemon.poll() is None
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_leak_check_reports_and_cleans_up(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(CONFTEST, suite / "conftest.py")
    (suite / "test_inner.py").write_text(textwrap.dedent(INNER))
    pids = tmp_path / "pids"
    basetemp = tmp_path / "basetemp"
    try:
        res = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
             f"--basetemp={basetemp}", f"--rootdir={suite}", "-o", "addopts=", str(suite)],
            env={**os.environ, "LEAK_PIDS": str(pids), "AUTOGENTOO_TEST_LEAK_GRACE": "0.5"},
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=suite,
        )  # fmt: skip
        out = res.stdout + res.stderr
        assert res.returncode == 1, out
        assert "7 passed, 4 errors" in out, out
        for test, what in [
            ("test_leaks_mount", f"mount {basetemp}"),
            ("test_leaks_loop", "loop device /dev/loop"),
            ("test_leaks_process", "(running): sleep 60"),
            ("test_leaks_zombie", "(zombie, never waited for)"),
        ]:
            assert f"ERROR at teardown of {test}" in out, out
            assert what in out, out
        assert "LEAK: the test session left behind:" in out, out
        session_report = out[out.index("LEAK: the test session") :]
        assert "(running): sleep 60" in session_report
        # The inner check undid what lay in its basetemp.
        mountinfo = Path("/proc/self/mountinfo").read_text()
        assert str(basetemp) not in mountinfo
        loops = [p.read_text() for p in Path("/sys/block").glob("loop*/loop/backing_file")]
        assert not any(str(basetemp) in b for b in loops)
    finally:
        # The leaked sleeps outlived the inner pytest: end them, by pid.
        for line in pids.read_text().split() if pids.exists() else []:
            if _alive(int(line)) and "sleep" in Path(f"/proc/{line}/cmdline").read_text():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line), signal.SIGKILL)
