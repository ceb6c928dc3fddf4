"""A real autogentoo daemon for tests: its own config, state dir and socket.

The daemon runs as a subprocess of the test (as root, like in production),
from the checkout, exactly as `autogentoo-daemon --config FILE` would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autogentoo.client.http import Client
from autogentoo.client.transport import LocalTransport


@dataclass
class DaemonProc:
    config_path: Path
    socket: Path
    state_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def client(self) -> Client:
        return Client(LocalTransport(str(self.socket)))

    def call(self, method: str, path: str, **kw: Any) -> Any:
        with self.client() as c:
            return c.call(method, path, **kw)

    def agctl(
        self, *args: str, check: bool = False, input: bytes | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the real agctl command line against this daemon."""
        r = subprocess.run(
            [sys.executable, "-m", "autogentoo.client", "--socket", str(self.socket), *args],
            capture_output=True,
            check=check,
            timeout=timeout,
            input=input,
            env={**os.environ, "AGCTL_HOST": ""},
        )
        return subprocess.CompletedProcess(
            r.args,
            r.returncode,
            r.stdout.decode(errors="replace"),
            r.stderr.decode(errors="replace"),
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_for_socket(
    path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            return
        time.sleep(0.02)
    raise RuntimeError(f"daemon did not listen on {path} in {timeout}s:\n{log.read_text()}")


def write_config(tmp: Path, overrides: dict[str, Any] | None = None) -> tuple[Path, Path]:
    sock = tmp / "run" / "api.sock"
    cfg: dict[str, Any] = {
        "socket": str(sock),
        "state_dir": str(tmp / "state"),
        "config_dir": str(tmp / "etc"),
        "stage3_dir": str(tmp / "stage3"),
        "caches": {
            "distfiles": str(tmp / "cache" / "distfiles"),
            "binpkgs": str(tmp / "cache" / "binpkgs"),
            "repos": str(tmp / "cache" / "repos"),
        },
        "jobs": {"portage_tmpfs_size": "64M", "max_parallel": 2},
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    (tmp / "stage3").mkdir(exist_ok=True)
    path = tmp / "daemon.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, sock


def start_daemon(
    tmp: Path, overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None
) -> DaemonProc:
    tmp.mkdir(parents=True, exist_ok=True)
    os.chmod(tmp, 0o755)  # other users' clients must reach the socket under it
    config, sock = write_config(tmp, overrides)
    log_path = tmp / "daemon.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "LISTEN_"))}
    full_env.update(env or {})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "autogentoo.daemon", "--config", str(config), "--debug"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for_socket(sock, proc, log_path)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return DaemonProc(config, sock, tmp / "state", proc, log_path, full_env)


@contextlib.contextmanager
def running_daemon(
    tmp: Path, overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None
) -> Iterator[DaemonProc]:
    d = start_daemon(tmp, overrides, env)
    try:
        yield d
    finally:
        rc = d.stop()
        if rc not in (0, -signal.SIGKILL):
            raise AssertionError(f"daemon exited with {rc}:\n{d.log()}")
