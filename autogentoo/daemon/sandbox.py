"""What runs in a job's child: namespaces, mounts, pivot into the root, exec.

The spawner (spawner.py) forks `enter()` for each job straight into a new
PID namespace, so the child is the job's PID 1 from its first instruction:

- *PID 1* (`enter`, `_init`): dies with the spawner (PR_SET_PDEATHSIG),
  unshares mount, IPC and UTS namespaces, makes / recursively slave (host
  mounts propagate in, nothing propagates out), mounts the job's
  filesystems under a bind of the root, pivots into it, starts the work and
  then reaps everything. When the work exits, PID 1 exits with it: the
  kernel kills whatever the job left running and, with the last process,
  drops the mount namespace and every mount in it.
- the *work*: a new session (and the pty as its controlling terminal when
  asked), the job's cwd, uid and environment, then exec. Started with
  posix_spawn (no copy of this interpreter) unless it needs a pty or
  another user.

The network namespace is the host's on purpose: jobs fetch distfiles and
sync repositories.

PID 1 tells the spawner what happened through one pipe, one JSON object per
line (each well under PIPE_BUF): {"t": "ready"} once the work has been
exec'd, {"t": "error", "message": ...} when setup failed, {"t": "status",
"status": S} with the work's wait status.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import gc
import json
import os
import re
import select
import signal
import socket
import traceback
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, NoReturn

from autogentoo.daemon import linux, mounts
from autogentoo.daemon.mounts import Bind, ImageMount
from autogentoo.errors import AgError, InvalidArgument, JobFailed
from autogentoo.names import SIZE_RE

__all__ = ["DEFAULT_ENV", "Bind", "ImageMount", "JobSetupError", "JobSpec", "enter", "job_env"]

DEFAULT_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "TERM": "dumb",
    "LANG": "C.UTF-8",
}

_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,62})")

# Signals a cancel may send; PID 1 forwards them to every process of the job.
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

INIT_NAME = "autogentoo-init"  # the comm of every job's PID 1
EXIT_SETUP_FAILED = 125  # PID 1's own status when setup failed


class JobSetupError(JobFailed):
    """The job could not be started: a mount failed, the command is not in the root..."""


def job_env(extra: Mapping[str, str] | None = None, *, term: str | None = None) -> dict[str, str]:
    """The minimal environment of a job, plus what the job adds."""
    env = dict(DEFAULT_ENV)
    if term:
        env["TERM"] = term
    if extra:
        env.update(extra)
    return env


@dataclass(frozen=True)
class JobSpec:
    """Everything needed to start one job; JSON round-trips through to_json/from_json.

    Lists given for argv and binds are stored as tuples.
    """

    root: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ENV))
    cwd: str = "/"
    binds: tuple[Bind, ...] = ()
    portage_tmpfs_size: str = "8G"
    resolv_conf: bytes | None = None
    hostname: str = "autogentoo"
    pty: bool = False
    uid: int = 0
    gid: int = 0
    # Loop-mounted read-only after the binds (so one may sit inside a bind).
    images: tuple[ImageMount, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "argv", tuple(self.argv))
        object.__setattr__(self, "binds", tuple(self.binds))
        object.__setattr__(self, "images", tuple(self.images))
        if not self.root.startswith("/"):
            raise InvalidArgument(f"job root {self.root!r} is not an absolute path")
        if not self.argv or not all(isinstance(a, str) and "\0" not in a for a in self.argv):
            raise InvalidArgument("a job needs a command: argv must be non-empty strings")
        if not self.cwd.startswith("/"):
            raise InvalidArgument(f"job cwd {self.cwd!r} is not an absolute path")
        for b in self.binds:
            if not b.source.startswith("/") or not b.target.startswith("/"):
                raise InvalidArgument(
                    f"bind {b.source!r} -> {b.target!r}: both paths must be absolute"
                )
            if ".." in b.target.split("/"):
                raise InvalidArgument(f"bind target {b.target!r} must not contain '..'")
        for i in self.images:
            if not i.source.startswith("/") or not i.target.startswith("/"):
                raise InvalidArgument(
                    f"image {i.source!r} -> {i.target!r}: both paths must be absolute"
                )
            if ".." in i.target.split("/"):
                raise InvalidArgument(f"image target {i.target!r} must not contain '..'")
            if i.fstype not in mounts.IMAGE_FSTYPES:
                raise InvalidArgument(f"image type {i.fstype!r} is not supported")
        if not SIZE_RE.fullmatch(self.portage_tmpfs_size):
            raise InvalidArgument(
                f"portage tmpfs size {self.portage_tmpfs_size!r} is not a size like 8G or 50%"
            )
        if not _HOSTNAME_RE.fullmatch(self.hostname):
            raise InvalidArgument(f"{self.hostname!r} is not a valid hostname")
        if any("=" in k or "\0" in k or "\0" in v for k, v in self.env.items()):
            raise InvalidArgument("job environment names must not contain '=' or NUL")

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "argv": list(self.argv),
            "env": dict(self.env),
            "cwd": self.cwd,
            "binds": [[b.source, b.target, b.readonly] for b in self.binds],
            "portage_tmpfs_size": self.portage_tmpfs_size,
            "resolv_conf": None
            if self.resolv_conf is None
            else base64.b64encode(self.resolv_conf).decode(),
            "hostname": self.hostname,
            "pty": self.pty,
            "uid": self.uid,
            "gid": self.gid,
            "images": [[i.source, i.target, i.fstype] for i in self.images],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> JobSpec:
        try:
            resolv = d.get("resolv_conf")
            return cls(
                root=str(d["root"]),
                argv=tuple(str(a) for a in d["argv"]),
                env={str(k): str(v) for k, v in d["env"].items()},
                cwd=str(d["cwd"]),
                binds=tuple(Bind(str(s), str(t), bool(ro)) for s, t, ro in d["binds"]),
                portage_tmpfs_size=str(d["portage_tmpfs_size"]),
                resolv_conf=None if resolv is None else base64.b64decode(resolv),
                hostname=str(d["hostname"]),
                pty=bool(d["pty"]),
                uid=int(d["uid"]),
                gid=int(d["gid"]),
                images=tuple(ImageMount(str(s), str(t), str(f)) for s, t, f in d.get("images", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgument(f"malformed job spec: {e}") from None


# --- in the job's processes ------------------------------------------------


def _record(fd: int, **what: Any) -> None:
    line = json.dumps(what).encode() + b"\n"
    with contextlib.suppress(OSError):
        os.write(fd, line[:4000])


def _describe(e: BaseException) -> str:
    if isinstance(e, AgError):
        return e.message
    if isinstance(e, OSError) and e.strerror:
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror}{where}"
    return "".join(traceback.format_exception_only(type(e), e)).strip()


def _close_all_but(keep: Sequence[int]) -> None:
    low = 3
    for fd in sorted(set(keep)):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 20)


_pending_signals: list[int] = []


def on_signal(sig: int, _frame: object) -> None:
    """The handler the spawner installs for FORWARDED before it forks any job.

    A job's PID 1 inherits it from the first instant: PID 1 drops signals it
    has no handler for, so a cancel sent while it sets up would be lost.
    In the job it is remembered and passed to every other process of the
    job; in the spawner itself it means stop.
    """
    if os.getpid() != 1:
        raise SystemExit(128 + sig)
    _pending_signals.append(sig)
    with contextlib.suppress(OSError):
        os.kill(-1, sig)  # everyone in this PID namespace but us


def enter(
    spec: JobSpec, stdio: tuple[int, int, int], status_w: int, spawner_pidfd: int
) -> NoReturn:
    """PID 1 of a new PID namespace, freshly forked by the spawner. Never returns."""
    try:
        gc.disable()  # a collection would touch (and copy) every page shared with the spawner
        linux.set_pdeathsig(signal.SIGKILL)
        linux.set_name(INIT_NAME)
        # The spawner may have died before our prctl: its pidfd is then readable.
        p = select.poll()
        p.register(spawner_pidfd, select.POLLIN)
        if p.poll(0):
            os._exit(EXIT_SETUP_FAILED)
        _close_all_but((*stdio, status_w))
        linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_SLAVE)
        socket.sethostname(spec.hostname)
    except BaseException as e:
        _record(status_w, t="error", message=f"cannot create the job's namespaces: {_describe(e)}")
        os._exit(EXIT_SETUP_FAILED)
    _init(spec, stdio, status_w)


def _lookup_portage(rootfd: int) -> tuple[int, int]:
    """uid and gid of the root's portage user, or root when it has none."""
    try:
        fd = mounts.open_in_root(rootfd, "etc/passwd", os.O_RDONLY)
    except OSError:
        return 0, 0
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split(":")
            if len(parts) >= 4 and parts[0] == "portage":
                with contextlib.suppress(ValueError):
                    return int(parts[2]), int(parts[3])
    return 0, 0


def _setup(stack: ExitStack, spec: JobSpec) -> None:
    """Mount everything under a bind of the root, then pivot into it."""
    where = spec.root
    try:
        rootfd = mounts.bind_root(stack, spec.root)  # owned by the stack
        where = "proc"
        mounts.mount_proc(stack, rootfd)
        where = "sys"
        mounts.mount_sys(stack, rootfd)
        where = "dev"
        mounts.mount_dev(stack, rootfd)
        where = "var/tmp/portage"
        uid, gid = _lookup_portage(rootfd)
        mounts.mount_portage_tmp(stack, rootfd, spec.portage_tmpfs_size, uid, gid)
        for b in spec.binds:
            where = f"{b.target} (bind of {b.source})"
            mounts.bind_mount(stack, rootfd, b)
        for i in spec.images:
            where = f"{i.target} ({i.fstype} image {i.source})"
            mounts.mount_image(stack, rootfd, i)
        if spec.resolv_conf is not None:
            where = "/etc/resolv.conf"
            mounts.bind_file_contents(stack, rootfd, "etc/resolv.conf", spec.resolv_conf)
        where = "the root (pivot_root)"
        os.fchdir(rootfd)
        linux.pivot_root(".", ".")
        # The old root is now stacked on the new one; detaching it drops every
        # host mount from this namespace.
        linux.umount2(".", linux.MNT_DETACH)
        os.chdir("/")
    except (OSError, AgError) as e:
        raise JobSetupError(f"cannot mount {where} in {spec.root}: {_describe(e)}") from e


def _init(spec: JobSpec, stdio: tuple[int, int, int], status_w: int) -> NoReturn:
    try:
        with ExitStack() as stack:
            _setup(stack, spec)
            # The mounts belong to this namespace now and die with it.
            stack.pop_all()
        if _pending_signals:
            _record(status_w, t="status", status=_pending_signals[0])  # as if killed by it
            os._exit(0)
        pid = _start_work(spec, stdio)
        for fd in stdio:
            os.close(fd)
        _record(status_w, t="ready")
        while True:
            try:
                reaped, status = os.waitpid(-1, 0)
            except ChildProcessError:  # cannot happen while the work lives
                status = 0
                break
            if reaped == pid:
                break
        _record(status_w, t="status", status=status)
        os._exit(0)
    except BaseException as e:
        _record(status_w, t="error", message=_describe(e))
        os._exit(EXIT_SETUP_FAILED)


def _start_work(spec: JobSpec, stdio: tuple[int, int, int]) -> int:
    """Start the job's command; JobSetupError if it cannot be exec'd."""
    try:
        os.chdir(spec.cwd)
    except OSError as e:
        raise JobSetupError(f"cannot change to {spec.cwd} in {spec.root}: {e.strerror}") from e
    if spec.pty or spec.uid or spec.gid:
        return _fork_work(spec, stdio)
    # posix_spawn (vfork underneath) copies no page tables: the common case
    # costs one exec, not a fork of this interpreter and then an exec.
    os.environ["PATH"] = spec.env.get("PATH", DEFAULT_ENV["PATH"])  # posix_spawnp searches ours
    actions: list[tuple[int, ...]] = [
        (os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)
    ]
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in set(stdio) if fd > 2]
    try:
        return os.posix_spawnp(
            spec.argv[0],
            list(spec.argv),
            dict(spec.env),
            file_actions=actions,
            setsid=True,
            setsigdef=(*FORWARDED, signal.SIGPIPE, signal.SIGXFSZ),
            setsigmask=(),
        )
    except OSError as e:
        raise JobSetupError(_exec_failure(spec, e)) from None


def _exec_failure(spec: JobSpec, e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC):
        return f"cannot execute {spec.argv[0]!r} in {spec.root}: {e.strerror}"
    return f"cannot start {spec.argv[0]!r} in {spec.root}: {_describe(e)}"


def _fork_work(spec: JobSpec, stdio: tuple[int, int, int]) -> int:
    """The slower path, for a controlling terminal or another user: fork, set up, exec."""
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _work(spec, stdio, err_w)
    os.close(err_w)
    failure = os.read(err_r, 4000)
    os.close(err_r)
    if failure:
        os.waitpid(pid, 0)
        raise JobSetupError(failure.decode("utf-8", "replace"))
    return pid


def _work(spec: JobSpec, stdio: tuple[int, int, int], err_w: int) -> NoReturn:
    """The job's command: a fork of PID 1 that execs argv."""
    try:
        for sig in (*FORWARDED, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        if spec.pty:
            fcntl.ioctl(0, linux.TIOCSCTTY, 0)
        if spec.gid or spec.uid:
            os.setgroups([])
            os.setgid(spec.gid)
            os.setuid(spec.uid)
        os.execvpe(spec.argv[0], spec.argv, dict(spec.env))
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.write(err_w, _exec_failure(spec, e).encode()[:4000] or b"?")
        os._exit(127)
