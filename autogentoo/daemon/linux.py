"""The few Linux syscalls Python 3.11 does not wrap, through ctypes.

Each wrapper raises OSError with the errno and the path it acted on, so a
failing mount reads like any other failed file operation. Nothing here keeps
state; callers own every fd they get back.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

# mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19

# umount2(2) flags
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# unshare(2) / clone(2) flags
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# prctl(2)
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36

# openat2(2)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# mount_setattr(2)
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_RDONLY = 0x1

# the mount API (open_tree, move_mount, fsopen, fsconfig, fsmount)
OPEN_TREE_CLONE = 1
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

_SYS_PIVOT_ROOT = 155
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_SYS_OPENAT2 = 437
_SYS_MOUNT_SETATTR = 442

TIOCSCTTY = 0x540E


def _check(rc: int, what: str, path: str | None = None) -> None:
    if rc < 0:
        err = ctypes.get_errno()
        if path is None:
            raise OSError(err, f"{what}: {os.strerror(err)}")
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    rc = _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data))
    if fstype:
        what = f"mount -t {fstype}"
    elif flags & MS_REMOUNT:
        what = "remount"
    elif flags & MS_BIND:
        what = "bind mount"
    else:
        what = "mount --make-*"
    _check(rc, what, target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), "umount", target)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def pivot_root(new_root: str, put_old: str) -> None:
    rc = _libc.syscall(ctypes.c_long(_SYS_PIVOT_ROOT), _b(new_root), _b(put_old))
    _check(rc, "pivot_root", new_root)


def set_pdeathsig(sig: int) -> None:
    """Ask the kernel to send `sig` to us when the thread that forked us dies."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0), "prctl")


def set_name(name: str) -> None:
    """The process's comm (what ps and /proc/PID/comm show), 15 bytes at most."""
    _check(_libc.prctl(PR_SET_NAME, _b(name[:15]), 0, 0, 0), "prctl")


def set_child_subreaper() -> None:
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1), 0, 0, 0), "prctl")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): open `path` relative to dirfd under the RESOLVE_* rules; returns an fd.

    O_CLOEXEC is always added: these fds are ours, never a child's.
    """
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dirfd),
        _b(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    _check(fd, "open", path)
    return int(fd)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr_fd(fd: int, attr_set: int, *, recursive: bool, what: str) -> None:
    """mount_setattr(2) on the mount an O_PATH fd points at (and its children)."""
    attr = _MountAttr(attr_set, 0, 0, 0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    rc = _libc.syscall(
        ctypes.c_long(_SYS_MOUNT_SETATTR),
        ctypes.c_int(fd),
        b"",
        ctypes.c_uint(flags),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(rc, "mount_setattr", what)


def fd_path(fd: int) -> str:
    """The magic-link path through which mount(2) can act on what fd points at."""
    return f"/proc/self/fd/{fd}"


def open_tree_clone(dirfd: int, path: str, *, recursive: bool) -> int:
    """open_tree(2) OPEN_TREE_CLONE: a detached copy of the mount(s) at path, as an fd."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | (AT_RECURSIVE if recursive else 0)
    if not path:
        flags |= AT_EMPTY_PATH
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(dirfd), _b(path), ctypes.c_uint(flags)
    )
    _check(fd, "open_tree", path or fd_path(dirfd))
    return int(fd)


def move_mount_fd(mount_fd: int, target_fd: int, what: str) -> None:
    """Attach the detached mount mount_fd on top of what target_fd points at."""
    rc = _libc.syscall(
        ctypes.c_long(_SYS_MOVE_MOUNT),
        ctypes.c_int(mount_fd),
        b"",
        ctypes.c_int(target_fd),
        b"",
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
    )
    _check(rc, "move_mount", what)


def fsmount_new(fstype: str, options: dict[str, str | None], attrs: int) -> int:
    """A new, still detached filesystem instance (fsopen, fsconfig, fsmount); returns its fd.

    options maps a key to its string value, or to None for a flag option.
    """
    fsfd = _libc.syscall(ctypes.c_long(_SYS_FSOPEN), _b(fstype), ctypes.c_uint(FSOPEN_CLOEXEC))
    _check(fsfd, f"fsopen {fstype}")
    try:
        for key, value in {"source": fstype, **options}.items():
            cmd = FSCONFIG_SET_FLAG if value is None else FSCONFIG_SET_STRING
            rc = _libc.syscall(
                ctypes.c_long(_SYS_FSCONFIG),
                ctypes.c_int(fsfd),
                ctypes.c_uint(cmd),
                _b(key),
                _b(value),
                ctypes.c_int(0),
            )
            _check(
                rc,
                f"{fstype} option {key}={value}" if value is not None else f"{fstype} option {key}",
            )
        rc = _libc.syscall(
            ctypes.c_long(_SYS_FSCONFIG),
            ctypes.c_int(fsfd),
            ctypes.c_uint(FSCONFIG_CMD_CREATE),
            None,
            None,
            ctypes.c_int(0),
        )
        _check(rc, f"create {fstype}")
        mfd = _libc.syscall(
            ctypes.c_long(_SYS_FSMOUNT),
            ctypes.c_int(fsfd),
            ctypes.c_uint(FSMOUNT_CLOEXEC),
            ctypes.c_uint(attrs),
        )
        _check(mfd, f"fsmount {fstype}")
        return int(mfd)
    finally:
        os.close(fsfd)
