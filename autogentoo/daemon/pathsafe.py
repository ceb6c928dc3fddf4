"""Resolve paths inside a root tree once, to a file descriptor, and never out of it.

A root is a tree the daemon does not trust: whoever ran commands in it may have
planted symlinks anywhere, and may swap a directory for a symlink between two
of our calls. So every path inside a root is resolved by the kernel, with
openat2(2) and RESOLVE_IN_ROOT, relative to an fd of the root: symlinks and
`..` are then evaluated as if the root were `/` (an absolute link to /etc means
the root's etc), magic links (/proc/self/root and friends) are refused, and
mount points are not crossed unless asked for (a bind mount left under a root
must not lead the daemon into a host directory). The resulting fd is what we
act on; a path string is never resolved a second time.

Refusals raise UnsafePath naming the path. Ordinary failures (a missing file,
a permission error) stay OSError so callers can tell "absent" from "refused".
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
from pathlib import Path
from types import TracebackType

from autogentoo.errors import BackendUnavailable, Conflict, NoSpace, TooLarge, UnsafePath

# openat2 has the same number on every architecture that uses the generic
# syscall table, which is all we run on (x86_64, aarch64).
SYS_OPENAT2 = 437

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# The kernel returns EAGAIN when a rename or mount raced with a `..` lookup
# under RESOLVE_IN_ROOT; retrying is what the man page asks for.
_EAGAIN_RETRIES = 32


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _openat2(dir_fd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    """Raw openat2; returns an fd or raises OSError (BackendUnavailable on ENOSYS)."""
    # The kernel refuses a mode unless a file may be created; O_TMPFILE includes
    # the O_DIRECTORY bit, so it must be compared whole.
    creates = flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE
    how = _OpenHow(flags | os.O_CLOEXEC, mode if creates else 0, resolve)
    encoded = os.fsencode(path)
    for _ in range(_EAGAIN_RETRIES):
        fd = _syscall(
            ctypes.c_long(SYS_OPENAT2),
            ctypes.c_int(dir_fd),
            ctypes.c_char_p(encoded),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err == errno.EAGAIN:
            continue
        if err == errno.ENOSYS:
            raise BackendUnavailable(
                f"this kernel ({os.uname().release}) has no openat2(2) (Linux 5.6 or later "
                "is needed); the daemon will not resolve paths inside roots without it"
            )
        raise OSError(err, os.strerror(err), path)
    raise UnsafePath(f"{path!r}: the tree kept changing while it was being resolved", path=path)


def check_openat2() -> None:
    """Fail early (at daemon start) when the kernel cannot do what this module needs."""
    fd = _openat2(-100, "/", os.O_PATH | os.O_DIRECTORY, 0, RESOLVE_IN_ROOT)  # AT_FDCWD
    os.close(fd)


def _clean_relpath(relpath: str) -> str:
    """Normalise a path inside a root; `..` is refused outright rather than clamped.

    A caller asking for `..` is either confused or hostile, and clamping would
    silently give it a different file than it named. A leading `/` means the
    root, as it does inside the chroot.
    """
    if "\0" in relpath:
        raise UnsafePath(f"{relpath!r}: path contains a NUL byte", path=relpath)
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePath(f"{relpath!r}: '..' is not allowed in a path inside a root", path=relpath)
    return "/".join(parts) or "."


def _refusal(relpath: str, err: OSError) -> UnsafePath | None:
    if err.errno == errno.ELOOP:
        return UnsafePath(
            f"{relpath!r}: refused a symlink (a magic link, a symlink where none is allowed, "
            "or too many levels of links)",
            path=relpath,
        )
    if err.errno == errno.EXDEV:
        return UnsafePath(
            f"{relpath!r}: the path leaves the root or crosses a mount point", path=relpath
        )
    return None


def open_root(path: Path) -> int:
    """An O_PATH directory fd for a root tree; the caller closes it.

    The root's own path is the daemon's (under its state directory), so it is
    trusted; everything below it is not.
    """
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


class RootDir:
    """`with RootDir(path) as root: open_in_root(root.fd, ...)`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> RootDir:
        self.fd = open_root(self.path)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_in_root(
    root_fd: int,
    relpath: str,
    flags: int,
    mode: int = 0o644,
    *,
    follow_final: bool = True,
    no_symlinks: bool = False,
    cross_mounts: bool = False,
) -> int:
    """Open relpath inside the root as if chrooted there; returns a new fd.

    follow_final=False adds O_NOFOLLOW (with O_PATH you get the link itself,
    otherwise a final symlink is refused); no_symlinks refuses a symlink in
    any component; cross_mounts allows descending into mounts under the root.
    """
    clean = _clean_relpath(relpath)
    resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
    if no_symlinks:
        resolve |= RESOLVE_NO_SYMLINKS
    if not cross_mounts:
        resolve |= RESOLVE_NO_XDEV
    if not follow_final:
        flags |= os.O_NOFOLLOW
    try:
        return _openat2(root_fd, clean, flags, mode, resolve)
    except OSError as e:
        refused = _refusal(relpath, e)
        if refused is not None:
            raise refused from e
        raise


def _split(relpath: str) -> tuple[str, str]:
    clean = _clean_relpath(relpath)
    if clean == ".":
        raise UnsafePath(f"{relpath!r}: names the root itself, not a file in it", path=relpath)
    parent, _, name = clean.rpartition("/")
    return parent or ".", name


def makedirs_in_root(root_fd: int, relpath: str, mode: int = 0o755) -> int:
    """Create relpath (and missing parents) inside the root; returns an O_PATH dir fd.

    Existing components are resolved in-root (a merged-usr /lib -> usr/lib
    link is followed, inside the root). Each missing component is made with
    mkdirat under its parent's fd and then opened with O_NOFOLLOW from that
    same fd, so a symlink swapped in between the two calls is refused.
    """
    clean = _clean_relpath(relpath)
    fd = os.dup(root_fd)
    try:
        if clean == ".":
            return fd
        done: list[str] = []
        for part in clean.split("/"):
            done.append(part)
            here = "/".join(done)
            try:
                nxt = open_in_root(root_fd, here, os.O_PATH | os.O_DIRECTORY)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, mode, dir_fd=fd)
                try:
                    nxt = os.open(
                        part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                    )
                except NotADirectoryError as e:
                    raise _not_a_dir(fd, part, here) from e
            except NotADirectoryError as e:
                raise _not_a_dir(fd, part, here) from e
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _not_a_dir(parent_fd: int, name: str, here: str) -> Exception:
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except OSError:
        return UnsafePath(f"{here!r}: changed while directories were being created", path=here)
    if stat.S_ISLNK(st.st_mode):
        return UnsafePath(
            f"{here!r}: is a symlink, refusing to create directories through it", path=here
        )
    return Conflict(f"{here!r}: exists inside the root and is not a directory", path=here)


def write_file_in_root(
    root_fd: int,
    relpath: str,
    data: bytes,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    *,
    make_parents: bool = False,
) -> None:
    """Atomically put data at relpath inside the root (temp file, fsync, rename).

    The rename happens inside the already-resolved parent directory fd, so the
    file lands in that directory whatever happens to paths meanwhile. A symlink
    at the target is replaced (never written through); a directory is refused.
    """
    parent, name = _split(relpath)
    if make_parents:
        dir_fd = makedirs_in_root(root_fd, parent)
    else:
        dir_fd = open_in_root(root_fd, parent, os.O_PATH | os.O_DIRECTORY)
    try:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise Conflict(f"{relpath!r}: is a directory inside the root", path=relpath)
        tmp = f".{name}.agtmp-{secrets.token_hex(6)}"
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dir_fd,
            )
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                # chown first: it clears setuid/setgid bits that fchmod sets.
                os.fchown(fd, uid, gid)
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(
                    f"no space left writing {relpath!r} inside the root", path=relpath
                ) from e
            if isinstance(e, IsADirectoryError):
                raise Conflict(f"{relpath!r}: is a directory inside the root", path=relpath) from e
            raise
        _fsync_dir(dir_fd)
    finally:
        os.close(dir_fd)


def _fsync_dir(dir_fd: int) -> None:
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_regular_in_root(root_fd: int, relpath: str) -> int:
    """Open a regular file inside the root for reading; anything else is refused.

    Resolved once to an O_PATH fd, checked with fstat, then reopened through
    /proc/self/fd: the same inode, and no open(2) side effects on a FIFO or a
    device node that a root may have planted where a file was expected.
    """
    pfd = open_in_root(root_fd, relpath, os.O_PATH)
    try:
        st = os.fstat(pfd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{relpath!r}: is not a regular file inside the root", path=relpath)
        return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    finally:
        os.close(pfd)


def read_file_in_root(root_fd: int, relpath: str, limit: int) -> bytes:
    """The content of a regular file inside the root, refusing more than limit bytes."""
    fd = open_regular_in_root(root_fd, relpath)
    try:
        chunks: list[bytes] = []
        got = 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
            if got > limit:
                raise TooLarge(f"{relpath!r}: larger than {limit} bytes", path=relpath, limit=limit)
        return b"".join(chunks)
    finally:
        os.close(fd)
