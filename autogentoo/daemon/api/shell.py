"""agctl shell: an interactive terminal in a root, over a WebSocket on the API socket.

Admin only: a root shell in a chroot is root on the build host. The shell is
a job like any other (exclusive on the root, logged, cancellable, gone with
its namespace); its terminal is a pty whose master the daemon bridges to the
WebSocket: binary frames are terminal bytes, text frames are JSON control
messages ({"resize": [cols, rows]} from the client, {"exit": status} from us).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import struct
import termios
from dataclasses import dataclass

from aiohttp import WSMsgType, web

from autogentoo import API_VERSION
from autogentoo.daemon import roots as roots_mod
from autogentoo.daemon import runner
from autogentoo.daemon.api import router
from autogentoo.daemon.config import Role
from autogentoo.daemon.jobs import JobContext, Lock
from autogentoo.daemon.routing import Ctx, doc_field
from autogentoo.daemon.service import DAEMON
from autogentoo.daemon.spawner import JobProcess

SHELLS = ("/bin/bash", "/bin/sh")


@dataclass(frozen=True)
class ShellQuery:
    cols: int = doc_field("terminal width", default=80)
    rows: int = doc_field("terminal height", default=24)
    term: str = doc_field("the client's TERM", default="xterm")


def _set_size(fd: int, cols: int, rows: int) -> None:
    cols, rows = max(1, min(cols, 1000)), max(1, min(rows, 1000))
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


@router.route(
    "GET",
    f"/{API_VERSION}/roots/{{name}}/shell",
    role=Role.ADMIN,
    query=ShellQuery,
    summary="An interactive shell in the root (WebSocket; admin only)",
    tag="roots",
)
async def root_shell(ctx: Ctx) -> web.StreamResponse:
    d = ctx.request.app[DAEMON]
    root = roots_mod.get(d, ctx.param("name", "root name"))
    roots_mod.usable(root)
    q: ShellQuery = ctx.query
    term = q.term if q.term.replace("-", "").isalnum() and len(q.term) < 64 else "xterm"
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(ctx.request)

    async def work(job: JobContext) -> None:
        path = d.storage_for(root.backend).path(root.name)
        shell = next((s for s in SHELLS if os.path.exists(f"{path}{s}")), "/bin/sh")
        master, slave = os.openpty()
        try:
            _set_size(master, q.cols, q.rows)
            spec = runner.job_spec(d, root, [shell, "-l"], pty=True, env={"TERM": term})
            proc = await d.spawner.spawn(spec, stdin=slave, stdout=slave, stderr=slave)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        job.log.line(f"shell {shell} started for {ctx.caller.user}")
        try:
            rc = await _bridge(ws, master, proc)
        finally:
            os.close(master)
        job.result["returncode"] = rc
        job.log.line(f"shell ended with status {rc}")

    job = d.jobs.submit(
        "shell",
        owner_uid=ctx.caller.uid,
        work=work,
        root=root.name,
        lock=Lock.EXCLUSIVE,
        params={"name": root.name},
    )
    await job.done.wait()
    row = d.jobs.get_row(job.id)
    if not ws.closed:
        await ws.send_str(
            json.dumps({"exit": row["returncode"], "state": row["state"], "job": job.id})
        )
        await ws.close()
    return ws


async def _bridge(ws: web.WebSocketResponse, master: int, proc: JobProcess) -> int:
    loop = asyncio.get_running_loop()
    os.set_blocking(master, False)
    output: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)

    def readable() -> None:
        try:
            data = os.read(master, 65536)
        except BlockingIOError:
            return
        except OSError:  # EIO: every process holding the slave is gone
            data = b""
        if output.full():
            return  # the client is slow: leave the bytes in the pty, it applies back-pressure
        output.put_nowait(data)
        if not data:
            loop.remove_reader(master)

    loop.add_reader(master, readable)

    async def pump_out() -> None:
        while data := await output.get():
            await ws.send_bytes(data)

    async def pump_in() -> None:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                view = memoryview(msg.data)
                while view:
                    try:
                        view = view[os.write(master, view) :]
                    except BlockingIOError:
                        await asyncio.sleep(0.01)
            elif msg.type == WSMsgType.TEXT:
                with contextlib.suppress(ValueError, TypeError, KeyError, OSError):
                    cols, rows = json.loads(msg.data)["resize"]
                    _set_size(master, int(cols), int(rows))

    out_task = loop.create_task(pump_out())
    in_task = loop.create_task(pump_in())
    wait_task = loop.create_task(proc.wait())
    try:
        done, _ = await asyncio.wait({wait_task, in_task}, return_when=asyncio.FIRST_COMPLETED)
        if wait_task not in done:
            # The client went away: end the shell's whole namespace.
            await proc.kill()
        rc = int(await wait_task)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(out_task, 2)
        return rc
    finally:
        if not wait_task.done():  # cancelled (agctl cancel, daemon stopping)
            await proc.kill(signal.SIGKILL)
        loop.remove_reader(master)
        for t in (out_task, in_task, wait_task):
            t.cancel()
        await asyncio.gather(out_task, in_task, wait_task, return_exceptions=True)
