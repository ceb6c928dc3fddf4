"""Uploads: files a client streams to the daemon (stage3s, scripts, configs).

The client never names a path the daemon reads; it uploads the bytes, gets an
id, and names the id. An upload belongs to the user who made it; a partial
upload (client gone, disk full, over the limit) leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from autogentoo.daemon import state as st
from autogentoo.daemon.auth import Caller
from autogentoo.errors import AgError, Code, InvalidArgument, NoSpace, NotFound

BATCH = 1 << 20


@dataclass(frozen=True)
class Upload:
    id: str
    owner_uid: int
    size: int
    sha256: str
    filename: str
    path: Path

    def json(self) -> dict[str, Any]:
        return {"id": self.id, "size": self.size, "sha256": self.sha256, "filename": self.filename}


def _write_batch(fd: int, h: Any, data: bytes) -> None:
    h.update(data)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def receive(
    request: web.Request,
    directory: Path,
    state: st.State,
    caller: Caller,
    filename: str,
    limit: int,
) -> Upload:
    declared = request.content_length
    if declared is not None and declared > limit:
        raise AgError(
            f"upload of {declared} bytes is over the limit of {limit} bytes",
            code=Code.PAYLOAD_TOO_LARGE,
            limit=limit,
        )
    upload_id = secrets.token_hex(12)
    part = directory / f"{upload_id}.part"
    final = directory / upload_id
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    h = hashlib.sha256()
    size = 0
    loop = asyncio.get_running_loop()
    buf = bytearray()
    try:
        try:
            async for chunk in request.content.iter_chunked(BATCH):
                size += len(chunk)
                if size > limit:
                    raise AgError(
                        f"upload is over the limit of {limit} bytes",
                        code=Code.PAYLOAD_TOO_LARGE,
                        limit=limit,
                    )
                buf += chunk
                if len(buf) >= BATCH:
                    # Hash and write off the event loop: hashlib and write(2)
                    # release the GIL, and a 1 GiB stage3 would stall every
                    # other client for seconds.
                    await loop.run_in_executor(None, _write_batch, fd, h, bytes(buf))
                    buf.clear()
            if buf:
                await loop.run_in_executor(None, _write_batch, fd, h, bytes(buf))
            await loop.run_in_executor(None, os.fsync, fd)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"no space left for the upload in {directory}") from None
            raise
        finally:
            os.close(fd)
        if declared is not None and size != declared:
            raise InvalidArgument(f"upload ended after {size} of {declared} bytes")
        os.rename(part, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
        raise
    digest = h.hexdigest()
    state.execute(
        "INSERT INTO uploads (id, owner_uid, size, sha256, filename, created) VALUES (?,?,?,?,?,?)",
        (upload_id, caller.uid, size, digest, filename, st.now()),
    )
    return Upload(upload_id, caller.uid, size, digest, filename, final)


def get(state: st.State, directory: Path, upload_id: str, caller: Caller) -> Upload:
    if not (len(upload_id) == 24 and all(c in "0123456789abcdef" for c in upload_id)):
        raise InvalidArgument(f"{upload_id[:40]!r} is not an upload id")
    row = state.one("SELECT * FROM uploads WHERE id=?", (upload_id,))
    # Someone else's upload is reported as missing, not as forbidden: ids
    # are secrets of a kind and their existence is not ours to confirm.
    if row is None or (row["owner_uid"] != caller.uid and not caller.is_admin):
        raise NotFound(f"there is no upload {upload_id}", upload=upload_id)
    return Upload(
        row["id"],
        row["owner_uid"],
        row["size"],
        row["sha256"],
        row["filename"],
        directory / row["id"],
    )


def delete(state: st.State, upload: Upload) -> None:
    state.execute("DELETE FROM uploads WHERE id=?", (upload.id,))
    upload.path.unlink(missing_ok=True)


def recover(state: st.State, directory: Path) -> None:
    """Drop partial files and rows whose file is gone (a crash mid-upload)."""
    for entry in directory.glob("*.part"):
        entry.unlink(missing_ok=True)
    for row in state.all("SELECT id FROM uploads"):
        if not (directory / row["id"]).exists():
            state.execute("DELETE FROM uploads WHERE id=?", (row["id"],))
