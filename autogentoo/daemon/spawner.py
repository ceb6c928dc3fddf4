"""The fork server that starts every job, and the daemon's handle on it.

The daemon runs asyncio and a thread pool, so it must never unshare, mount
or chroot itself, and forking it per job would copy all of that. Instead it
starts this module once (`python -m autogentoo.daemon.spawner`): a small,
single-threaded process, connected by a SOCK_SEQPACKET socketpair, that dies
with the daemon (PR_SET_PDEATHSIG). For each job it forks sandbox.enter(),
which is cheap and safe from a single thread; no interpreter starts per job.

Protocol, one JSON object per datagram:

  daemon -> spawner  {"op": "spawn", "id": N, "spec": {...}}  + 3 fds (stdin, stdout, stderr)
                     {"op": "kill", "id": N, "signal": S}
  spawner -> daemon  {"event": "hello", "pid": P}
                     {"event": "started", "id": N, "pid": P}   P: the job's PID 1 (host view)
                     {"event": "exited", "id": N, "returncode": R}  R < 0: killed by signal -R
                     {"event": "exited", "id": N, "error": "..."}    setup failed, nothing ran

When the daemon's end closes, the spawner kills every job and exits.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import selectors
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autogentoo.daemon import linux, sandbox
from autogentoo.daemon.sandbox import JobSetupError, JobSpec
from autogentoo.errors import AgError, Code

if __name__ != "__main__" or TYPE_CHECKING:
    # Only the daemon's side needs these. The fork server does without: every
    # page it maps is one more to copy on each job's fork.
    import asyncio
    import logging
    import subprocess
    from pathlib import Path

    log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20


class SpawnerDied(AgError):
    """The fork server went away; every job it was running was killed with it."""

    code = Code.INTERNAL


# --- the spawner process -------------------------------------------------------


def describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


@dataclass
class _Child:
    id: int
    pid: int  # the job's PID 1, in our PID namespace
    pidfd: int
    status_r: int
    buf: bytearray = field(default_factory=bytearray)
    started_sent: bool = False
    error: str | None = None
    work_status: int | None = None
    init_status: int | None = None
    eof: bool = False


class _Server:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sel = selectors.DefaultSelector()
        self.children: dict[int, _Child] = {}
        self.by_fd: dict[int, _Child] = {}
        # Handed to every job: PID 1 polls it once to learn whether we died
        # before its PR_SET_PDEATHSIG took hold.
        self.self_pidfd = os.pidfd_open(os.getpid())
        # Each job is forked into a PID namespace of its own: unshare sets it
        # for our next child only, and setns back to ours resets that.
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)

    def send(self, **msg: Any) -> None:
        try:
            self.sock.send(json.dumps(msg).encode())
        except OSError:
            self.shutdown()

    def serve(self) -> None:
        self.sel.register(self.sock, selectors.EVENT_READ)
        self.send(event="hello", pid=os.getpid())
        try:
            while True:
                for key, _ in self.sel.select():
                    if key.fileobj is self.sock:
                        self.on_message()
                        continue
                    child = self.by_fd.get(key.fd)
                    if child is None:
                        continue
                    if key.fd == child.pidfd:
                        self.on_exit(child)
                    else:
                        self.on_status(child)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        for child in self.children.values():
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
        for child in self.children.values():
            if child.init_status is None:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(child.pid, 0)
        os._exit(0)

    def on_message(self) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 3)
        except OSError:
            self.shutdown()
        if not data:
            for fd in fds:
                os.close(fd)
            self.shutdown()
        try:
            msg = json.loads(data)
            op = msg["op"]
            job_id = int(msg["id"])
        except (ValueError, KeyError, TypeError):
            for fd in fds:
                os.close(fd)
            print(f"autogentoo spawner: bad message {data[:200]!r}", file=sys.stderr)
            return
        if op == "spawn":
            self.spawn(job_id, msg.get("spec"), fds, flags)
            return
        for fd in fds:
            os.close(fd)
        child = self.children.get(job_id)
        if op == "kill" and child is not None and child.init_status is None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(child.pidfd, int(msg.get("signal", signal.SIGTERM)))

    def spawn(self, job_id: int, untrusted_spec: Any, fds: list[int], flags: int) -> None:
        try:
            if len(fds) != 3 or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise AgError("spawn needs exactly stdin, stdout and stderr")
            spec = JobSpec.from_json(untrusted_spec)
        except AgError as e:
            for fd in fds:
                os.close(fd)
            self.send(event="exited", id=job_id, error=e.message)
            return
        status_r, status_w = os.pipe()
        try:
            linux.unshare(linux.CLONE_NEWPID)
            try:
                pid = os.fork()
                if pid == 0:
                    sandbox.enter(spec, (fds[0], fds[1], fds[2]), status_w, self.self_pidfd)
            finally:
                linux.setns(self.own_pidns, linux.CLONE_NEWPID)
        except OSError as e:
            os.close(status_r)
            self.send(event="exited", id=job_id, error=f"cannot fork the job: {e.strerror}")
            return
        finally:
            os.close(status_w)
            for fd in fds:
                os.close(fd)
        os.set_blocking(status_r, False)
        # Nobody else can reap pid, so this pidfd names our child for sure.
        child = _Child(job_id, pid, os.pidfd_open(pid), status_r)
        self.children[job_id] = child
        self.by_fd[child.pidfd] = child
        self.by_fd[status_r] = child
        self.sel.register(child.pidfd, selectors.EVENT_READ)
        self.sel.register(status_r, selectors.EVENT_READ)

    def on_status(self, child: _Child) -> None:
        try:
            data = os.read(child.status_r, 65536)
        except BlockingIOError:
            return
        if not data:
            child.eof = True
            self.sel.unregister(child.status_r)
            del self.by_fd[child.status_r]
            os.close(child.status_r)
            self.maybe_finish(child)
            return
        child.buf += data
        while b"\n" in child.buf:
            line, _, rest = bytes(child.buf).partition(b"\n")
            child.buf = bytearray(rest)
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            t = rec.get("t")
            if t == "ready" and not child.started_sent:
                child.started_sent = True
                self.send(event="started", id=child.id, pid=child.pid)
            elif t == "error" and child.error is None:
                child.error = str(rec.get("message"))
            elif t == "status":
                child.work_status = int(rec["status"])

    def on_exit(self, child: _Child) -> None:
        try:
            _, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:
            status = 0
        child.init_status = status
        self.sel.unregister(child.pidfd)
        del self.by_fd[child.pidfd]
        self.maybe_finish(child)

    def maybe_finish(self, child: _Child) -> None:
        # Both: PID 1 reaped (so every process of the job is gone) and its
        # pipe drained (so we know what it said).
        if child.init_status is None or not child.eof:
            return
        os.close(child.pidfd)
        del self.children[child.id]
        if child.error is not None:
            self.send(event="exited", id=child.id, error=child.error)
        elif child.work_status is not None:
            self.send(
                event="exited", id=child.id, returncode=os.waitstatus_to_exitcode(child.work_status)
            )
        elif child.started_sent:
            # PID 1 itself was killed (SIGKILL: a hard cancel): the job with it.
            self.send(
                event="exited", id=child.id, returncode=os.waitstatus_to_exitcode(child.init_status)
            )
        else:
            rc = os.waitstatus_to_exitcode(child.init_status)
            self.send(
                event="exited",
                id=child.id,
                error=f"the job's sandbox ended during setup ({describe_status(rc)})",
            )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    fd, parent = int(args[0]), int(args[1])
    linux.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:
        sys.exit(1)
    os.chdir("/")
    # Installed before any fork, so each job's PID 1 has them from its first instant.
    for sig in sandbox.FORWARDED:
        signal.signal(sig, sandbox.on_signal)
    sock = socket.socket(fileno=fd)
    server = _Server(sock)
    # Everything imported so far is shared with every job: keep the
    # collector from ever touching (and so copying) those pages.
    gc.freeze()
    server.serve()


# --- the daemon's side ------------------------------------------------------------


@dataclass
class _Pending:
    started: asyncio.Future[int]
    done: asyncio.Future[int]


class JobProcess:
    """A running job. wait() gives its return code (negative: killed by that signal)."""

    def __init__(self, spawner: Spawner, job_id: int, pid: int, done: asyncio.Future[int]) -> None:
        self._spawner = spawner
        self.id = job_id
        self.pid = pid  # the job's PID 1 in the host's PID namespace
        self._done = done

    @property
    def returncode(self) -> int | None:
        if self._done.done() and not self._done.cancelled() and self._done.exception() is None:
            return self._done.result()
        return None

    async def wait(self) -> int:
        return await asyncio.shield(self._done)

    async def kill(self, sig: int = signal.SIGTERM) -> None:
        """Signal every process of the job (SIGKILL ends its namespace at once)."""
        if self._done.done():
            return
        await self._spawner._send({"op": "kill", "id": self.id, "signal": int(sig)})


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Spawner:
    """The daemon's handle on the fork server. Call start() from the event loop thread."""

    def __init__(self, python: str | None = None) -> None:
        self._python = python or sys.executable
        self._proc: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._hello: asyncio.Future[int] | None = None
        self._jobs: dict[int, _Pending] = {}
        self._next_id = 1
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def running(self) -> bool:
        return self._sock is not None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._sock is not None else None

    async def start(self) -> None:
        async with self._lock:
            if self._sock is not None:
                return
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pkg_parent = str(Path(__file__).resolve().parents[2])
            env = {"PATH": sandbox.DEFAULT_ENV["PATH"], "LANG": "C.UTF-8", "PYTHONPATH": pkg_parent}
            try:
                # The fork happens on this thread: PR_SET_PDEATHSIG in the
                # spawner watches the thread that forked it.
                self._proc = await asyncio.create_subprocess_exec(
                    self._python,
                    "-m",
                    "autogentoo.daemon.spawner",
                    str(theirs.fileno()),
                    str(os.getpid()),
                    pass_fds=[theirs.fileno()],
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            ours.setblocking(False)
            self._sock = ours
            loop = asyncio.get_running_loop()
            self._hello = loop.create_future()
            loop.add_reader(ours.fileno(), self._on_readable)
            try:
                await asyncio.wait_for(asyncio.shield(self._hello), 30)
            except BaseException:
                self._died("the job spawner did not start")
                raise

    async def stop(self) -> None:
        async with self._lock:
            proc = self._proc
            self._died("the daemon is stopping")
            if proc is not None:
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
            self._proc = None
            for task in list(self._tasks):
                await task

    async def spawn(self, spec: JobSpec, stdin: int, stdout: int, stderr: int) -> JobProcess:
        """Start a job; returns once its command has been exec'd inside the root.

        Raises JobSetupError with a readable message when the sandbox could
        not be set up (a mount failed, the command is missing in the root).
        The fds are duplicated into the job; the caller still owns and closes its own.
        """
        if self._sock is None:
            await self.start()
        loop = asyncio.get_running_loop()
        job_id = self._next_id
        self._next_id += 1
        pending = _Pending(loop.create_future(), loop.create_future())
        self._jobs[job_id] = pending
        try:
            await self._send(
                {"op": "spawn", "id": job_id, "spec": spec.to_json()}, (stdin, stdout, stderr)
            )
            pid = await asyncio.shield(pending.started)
        except asyncio.CancelledError:
            # Nobody will own this job: make sure it does not run.
            if not pending.done.done():
                with contextlib.suppress(Exception):
                    await self._send({"op": "kill", "id": job_id, "signal": signal.SIGKILL})
            raise
        except BaseException:
            self._jobs.pop(job_id, None)
            raise
        return JobProcess(self, job_id, pid, pending.done)

    # -- plumbing --

    async def _send(self, msg: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        data = json.dumps(msg).encode()
        if len(data) > MAX_MESSAGE:
            raise AgError("job spec too large for the spawner", code=Code.INVALID_ARGUMENT)
        while True:
            sock = self._sock
            if sock is None:
                raise SpawnerDied("the job spawner is not running")
            try:
                socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
                return
            except BlockingIOError:
                pass
            except OSError as e:
                self._died(f"the job spawner went away ({e.strerror})")
                raise SpawnerDied("the job spawner went away; the job did not start") from e
            loop = asyncio.get_running_loop()
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_writer(sock.fileno(), _set_once, ready)
            try:
                await ready
            finally:
                loop.remove_writer(sock.fileno())

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                data = sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError as e:
                self._died(f"the job spawner went away ({e.strerror})")
                return
            if not data:
                self._died("the job spawner died")
                return
            try:
                self._dispatch(json.loads(data))
            except (ValueError, KeyError, TypeError):
                log.error("bad message from the job spawner: %r", data[:200])

    def _dispatch(self, msg: dict[str, Any]) -> None:
        event = msg["event"]
        if event == "hello":
            if self._hello is not None and not self._hello.done():
                self._hello.set_result(int(msg["pid"]))
            return
        pending = self._jobs.get(int(msg["id"]))
        if pending is None:
            return
        if event == "started":
            if not pending.started.done():
                pending.started.set_result(int(msg["pid"]))
        elif event == "exited":
            del self._jobs[int(msg["id"])]
            if "error" in msg:
                err = JobSetupError(f"job setup failed: {msg['error']}")
                if "No space left on device" in str(msg["error"]):
                    # Setting up a job on a full disk: the user's fix is space.
                    err.code = Code.NO_SPACE
                for fut in (pending.started, pending.done):
                    if not fut.done():
                        fut.set_exception(err)
                # Only the spawn() caller sees this one.
                pending.done.exception()
            else:
                rc = int(msg["returncode"])
                if not pending.started.done():
                    pending.started.set_exception(
                        JobSetupError(f"job ended before it started ({describe_status(rc)})")
                    )
                if not pending.done.done():
                    pending.done.set_result(rc)

    def _died(self, reason: str) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(SpawnerDied(reason))
            self._hello.exception()
        jobs, self._jobs = self._jobs, {}
        for pending in jobs.values():
            err = SpawnerDied(f"{reason}; the job was killed with it")
            for fut in (pending.started, pending.done):
                if not fut.done():
                    fut.set_exception(err)
            pending.done.exception()  # marked retrieved: a job nobody waits for is not an error
        proc = self._proc
        if proc is not None and proc.returncode is None and not self._lock.locked():
            task = asyncio.get_running_loop().create_task(proc.wait())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not self._lock.locked():
            self._proc = None


if __name__ == "__main__":
    main()
