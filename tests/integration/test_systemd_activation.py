"""Under systemd: socket activation (LISTEN_FDS) and sd_notify, for real.

systemd is not PID 1 here, so the pieces it would provide are provided by
its own tools or by the test: `systemd-socket-activate` binds the socket and
passes it exactly as systemd does, and the test binds the NOTIFY_SOCKET and
reads what the daemon tells it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from autogentoo.client.http import Client
from autogentoo.client.transport import LocalTransport
from tests.helpers.daemon import write_config

pytestmark = pytest.mark.integration


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="agt-sd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Notifications:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, needle: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages:
                if needle in m:
                    return m
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break
        raise AssertionError(f"no {needle!r} from the daemon; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


def _activate(
    workdir: Path, notify: Path, extra_env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    config, _ = write_config(workdir)
    sock = workdir / "activated.sock"
    log = workdir / "daemon.log"
    argv = [
        "systemd-socket-activate",
        "-l",
        str(sock),
        "-E",
        f"NOTIFY_SOCKET={notify}",
        "-E",
        f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}",
    ]
    for k, v in extra_env.items():
        argv += ["-E", f"{k}={v}"]
    argv += [sys.executable, "-m", "autogentoo.daemon", "--config", str(config)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "systemd-socket-activate did not bind"
        time.sleep(0.02)
    return proc, sock, log


def test_socket_activation_and_notify(workdir: Path) -> None:
    notify = Notifications(workdir / "notify.sock")
    proc, sock, log = _activate(workdir, notify.path, {"WATCHDOG_USEC": "400000"})
    try:
        # The first connection starts the daemon; it is served once it is up.
        with Client(LocalTransport(str(sock))) as c:
            status = c.call("GET", "/status")
        assert status["systemd"] is True
        assert status["pid"] == proc.pid  # systemd-socket-activate execs the daemon
        ready = notify.wait_for("READY=1")
        assert "STATUS=serving the socket from systemd" in ready
        assert f"MAINPID={proc.pid}" in ready
        notify.wait_for("WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        notify.wait_for("STOPPING=1")
        # The socket belongs to systemd: the daemon must not remove it.
        assert sock.exists()
        assert "the socket from systemd" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_outside_systemd_nothing_is_sent(workdir: Path) -> None:
    """No NOTIFY_SOCKET, no LISTEN_FDS: the daemon binds its own socket and logs to stderr."""
    from tests.helpers.daemon import running_daemon

    with running_daemon(workdir) as d:
        assert d.call("GET", "/status")["systemd"] is False
    assert "serving " + str(d.socket) in d.log()
