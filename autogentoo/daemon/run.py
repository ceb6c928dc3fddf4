"""The one way the daemon runs a program.

argv lists only, never a shell string; a fixed minimal environment; stdin
from /dev/null unless input is given; the command logged with shlex.join;
exit status and death by signal told apart; the child always reaped, and
terminated first if we are interrupted (cancelled, or an exception).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from autogentoo.errors import AgError, CommandFailed, NoSpace

log = logging.getLogger(__name__)

# What every child gets; nothing from the daemon's own environment leaks in.
BASE_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
}

ENOSPC_MARKERS = ("No space left on device", "Disk quota exceeded")

_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with(parent: int) -> None:
    """In the child, before exec: be killed when the daemon dies.

    A daemon killed mid-import must not leave tar writing into a root that the
    next daemon is removing. Only a foreign call and a getppid: nothing that
    could need a lock another thread held at fork time.
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the daemon died before the prctl
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


def describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode}"


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(BASE_ENV)
    if extra:
        env.update(extra)
    return env


def _failure(argv: Sequence[str], returncode: int, stderr: bytes) -> AgError:
    tail = stderr.decode("utf-8", "replace").strip().splitlines()[-5:]
    msg = f"{shlex.join(argv)} {describe_status(returncode)}"
    if tail:
        msg += ": " + " / ".join(tail)
    if any(marker in line for line in tail for marker in ENOSPC_MARKERS):
        return NoSpace(msg, command=argv[0])
    return CommandFailed(msg, command=argv[0], returncode=returncode)


async def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    check: bool = True,
    capture: bool = True,
    timeout: float | None = None,
) -> Result:
    """Run argv to completion; raise CommandFailed (or NoSpace) when check is set."""
    argv = tuple(str(a) for a in argv)
    log.debug("+ %s", shlex.join(argv))
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(env),
        cwd=cwd,
        start_new_session=True,
        # run() is called on the event loop's thread, which lives as long as
        # the daemon (the death signal follows the thread that forked).
        preexec_fn=functools.partial(_die_with, os.getpid()),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except BaseException:
        await _reap(proc)
        raise
    assert proc.returncode is not None
    result = Result(argv, proc.returncode, out or b"", err or b"")
    if check and proc.returncode != 0:
        raise _failure(argv, proc.returncode, result.stderr)
    return result


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Terminate a child we are abandoning, escalate to SIGKILL, and wait for it."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(proc.wait()), 5)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


def run_sync(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    check: bool = True,
    timeout: float | None = None,
) -> Result:
    """Blocking twin of run(), for code already off the event loop (threads, tools)."""
    argv = tuple(str(a) for a in argv)
    log.debug("+ %s", shlex.join(argv))
    with subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(env),
        cwd=cwd,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    result = Result(argv, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise _failure(argv, proc.returncode, err)
    return result
