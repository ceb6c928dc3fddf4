"""Talking to systemd: socket activation, readiness, status and the watchdog.

Everything degrades to a no-op outside systemd, so the daemon runs the same
way from a shell, a test or a unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


def _notify(state: str) -> None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        import systemd.daemon

        systemd.daemon.notify(state)
    except ImportError:
        _notify_fallback(state)


def _notify_fallback(state: str) -> None:
    # Without systemd-python (a minimal install): the protocol is one datagram.
    path = os.environ["NOTIFY_SOCKET"]
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(state.encode(), path)


def ready(status: str) -> None:
    _notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")


def status(text: str) -> None:
    _notify(f"STATUS={text}")


def stopping(text: str = "stopping") -> None:
    _notify(f"STOPPING=1\nSTATUS={text}")


def listen_socket() -> socket.socket | None:
    """The listening socket systemd passed us (LISTEN_FDS), if any."""
    try:
        import systemd.daemon

        fds = systemd.daemon.listen_fds()
    except ImportError:
        fds = _listen_fds_fallback()
    if not fds:
        return None
    if len(fds) > 1:
        log.warning("systemd passed %d sockets; using the first", len(fds))
    sock = socket.socket(fileno=fds[0])
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise RuntimeError("the socket systemd passed is not a UNIX stream socket")
    sock.setblocking(False)
    return sock


def _listen_fds_fallback() -> list[int]:
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    n = int(os.environ.get("LISTEN_FDS", "0"))
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n))


def watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6
    except ValueError:
        return None


async def watchdog_loop() -> None:
    """Ping the watchdog from the event loop, so a wedged loop gets us restarted."""
    interval = watchdog_interval()
    if interval is None:
        return
    log.info("watchdog every %.1fs", interval / 2)
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            _notify("WATCHDOG=1")
            await asyncio.sleep(interval / 2)
