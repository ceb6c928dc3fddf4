"""A job's log: an append-only file on disk that live readers can follow.

The file is the truth (it survives the daemon); followers read it from an
offset and wait on an event for more. Nothing is buffered whole in memory,
so a thousand clients tailing a kernel build cost a file descriptor each.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

CHUNK = 64 * 1024

log = logging.getLogger(__name__)


class JobLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self.size = os.fstat(self._fd).st_size
        self.closed = False
        # Bytes that could not be written because the disk was full. A full
        # disk must not take the daemon's bookkeeping down with the log: the
        # job still ends, releases its root and is recorded (as failed with
        # no_space, see JobManager), and the daemon keeps serving.
        self.lost = 0
        self._more = asyncio.Event()

    def write(self, data: bytes) -> None:
        if self.closed or not data:
            return
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
                self.size += n
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if not self.lost:
                log.error("no space left for job log %s; dropping its output", self.path)
            self.lost += len(view)
        self._wake()

    def line(self, text: str) -> None:
        self.write(text.encode() + b"\n")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        os.close(self._fd)
        self._wake()

    def _wake(self) -> None:
        self._more.set()
        self._more = asyncio.Event()

    async def wait_for_more(self, offset: int) -> None:
        if self.closed or self.size > offset:
            return
        await self._more.wait()


async def follow(path: Path, live: JobLog | None, offset: int = 0) -> AsyncIterator[bytes]:
    """Yield the log from offset; while `live` is open, keep waiting for more."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        while True:
            chunk = os.pread(fd, CHUNK, offset)
            if chunk:
                offset += len(chunk)
                yield chunk
                continue
            if live is None or live.closed:
                # One last read: the writer may have appended before closing.
                tail = os.pread(fd, CHUNK, offset)
                if not tail:
                    return
                offset += len(tail)
                yield tail
                continue
            await live.wait_for_more(offset)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
