"""Every mount and unmount autogentoo makes, and nothing else.

Two halves:

- Inside a job's private mount namespace (called by sandbox.py, in the job's
  PID 1 before it pivots into the root): proc, read-only sysfs, a minimal
  /dev, devpts, the portage tmpfs, the cache binds and resolv.conf. Every
  filesystem is built detached (fsopen/fsmount, open_tree) and attached with
  move_mount onto an O_PATH fd that was resolved with openat2
  RESOLVE_IN_ROOT, so no path inside the root is ever resolved twice and no
  symlink in the root can send a mount outside it. Each mount is pushed on an
  ExitStack the moment it exists. (This is the minimal safe resolution the
  job needs; pathsafe.py is meant to become the shared home of it.)
- In the host namespace: reading /proc/self/mountinfo and removing every
  mount under a root, deepest first, in one call, or saying which process
  holds the one that will not go.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field

from autogentoo.daemon import linux
from autogentoo.errors import AgError, MountBusy, UnsafePath

# Symlinks inside the root are followed as if the root were /; /proc magic
# links never are.
_IN_ROOT = linux.RESOLVE_IN_ROOT | linux.RESOLVE_NO_MAGICLINKS


class MountError(AgError):
    """A mount or unmount failed for a reason other than being busy."""


# --- safe resolution inside a root -----------------------------------------


def _rel(path: str) -> str:
    """A path inside the root, made relative; '..' is refused outright."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePath(f"{path!r}: '..' is not allowed in a path inside a root", path=path)
    return "/".join(parts)


def open_in_root(rootfd: int, path: str, flags: int = os.O_PATH) -> int:
    """Open path inside the root (symlinks resolved as if chrooted); returns an fd."""
    rel = _rel(path)
    return linux.openat2(rootfd, rel or ".", flags, _IN_ROOT)


def makedirs_in_root(rootfd: int, path: str, mode: int = 0o755) -> int:
    """mkdir -p inside the root; returns an O_PATH fd on the directory."""
    rel = _rel(path)
    try:
        return linux.openat2(rootfd, rel or ".", os.O_PATH | os.O_DIRECTORY, _IN_ROOT)
    except FileNotFoundError:
        pass
    parent, _, name = rel.rpartition("/")
    pfd = makedirs_in_root(rootfd, parent, mode)
    try:
        # mkdirat never follows a symlink in its last component: a dangling
        # link there is EEXIST, and the openat2 below then refuses it.
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=pfd)
    finally:
        os.close(pfd)
    return linux.openat2(rootfd, rel, os.O_PATH | os.O_DIRECTORY, _IN_ROOT)


def _file_in_root(rootfd: int, path: str) -> int:
    """An O_PATH fd on a regular file inside the root, created empty if missing."""
    rel = _rel(path)
    try:
        return linux.openat2(rootfd, rel, os.O_PATH, _IN_ROOT)
    except FileNotFoundError:
        pass
    parent, _, name = rel.rpartition("/")
    pfd = makedirs_in_root(rootfd, parent)
    try:
        try:
            fd = os.open(
                name,
                os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=pfd,
            )
        except FileExistsError:
            raise UnsafePath(
                f"/{rel} in the root is a symlink that points nowhere; remove it or make it a file",
                path=path,
            ) from None
        os.close(fd)
    finally:
        os.close(pfd)
    return linux.openat2(rootfd, rel, os.O_PATH, _IN_ROOT)


# --- mounts inside the job's namespace --------------------------------------


@dataclass(frozen=True)
class Bind:
    """A host path bound into the root. source is the daemon's, target is in the root."""

    source: str
    target: str
    readonly: bool = True


def _detach(fd: int) -> None:
    with contextlib.suppress(OSError):
        linux.umount2(linux.fd_path(fd), linux.MNT_DETACH)
    with contextlib.suppress(OSError):
        os.close(fd)


def _attach(stack: ExitStack, mfd: int, targetfd: int, what: str) -> int:
    """Attach the detached mount mfd over targetfd; register its undo; return mfd.

    After move_mount, mfd refers to the attached mount's root: the handle for
    populating it, mounting under it and, on the error path, detaching it.
    """
    try:
        linux.move_mount_fd(mfd, targetfd, what)
    except BaseException:
        os.close(mfd)
        raise
    finally:
        os.close(targetfd)
    stack.callback(_detach, mfd)
    return mfd


def _new_fs(
    stack: ExitStack,
    rootfd: int,
    target: str,
    fstype: str,
    options: dict[str, str | None],
    attrs: int,
) -> int:
    targetfd = makedirs_in_root(rootfd, target)
    try:
        mfd = linux.fsmount_new(fstype, options, attrs)
    except BaseException:
        os.close(targetfd)
        raise
    return _attach(stack, mfd, targetfd, f"{fstype} on {target}")


_NOSUID_NODEV_NOEXEC = linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV | linux.MOUNT_ATTR_NOEXEC


def bind_root(stack: ExitStack, root: str) -> int:
    """Bind the root onto itself (pivot_root needs a mount); returns an fd on it.

    Everything else is mounted below this fd, so the job's mounts all hang
    off the copy and go with it.
    """
    mfd = linux.open_tree_clone(linux.AT_FDCWD, root, recursive=True)
    targetfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return _attach(stack, mfd, targetfd, root)


def mount_proc(stack: ExitStack, rootfd: int) -> None:
    """proc of the caller's PID namespace: call it from the job's PID 1."""
    os.close(_new_fs(stack, rootfd, "proc", "proc", {}, _NOSUID_NODEV_NOEXEC))


def mount_sys(stack: ExitStack, rootfd: int) -> None:
    os.close(
        _new_fs(stack, rootfd, "sys", "sysfs", {}, _NOSUID_NODEV_NOEXEC | linux.MOUNT_ATTR_RDONLY)
    )


# (name, major, minor): what a build needs, and never a disk.
DEV_NODES = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)
DEV_LINKS = (
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("core", "/proc/kcore"),
)
DEVPTS_OPTIONS: dict[str, str | None] = {
    "newinstance": None,
    "gid": "5",
    "mode": "620",
    "ptmxmode": "666",
}


def mount_dev(stack: ExitStack, rootfd: int) -> None:
    """A tmpfs /dev with the nodes above, devpts on dev/pts and a tmpfs on dev/shm."""
    devfd = _new_fs(
        stack,
        rootfd,
        "dev",
        "tmpfs",
        {"mode": "755", "size": "1m"},
        linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NOEXEC,
    )
    try:
        old = os.umask(0)
        try:
            for name, major, minor in DEV_NODES:
                os.mknod(name, 0o20666, os.makedev(major, minor), dir_fd=devfd)
            for name, dest in DEV_LINKS:
                os.symlink(dest, name, dir_fd=devfd)
            os.mkdir("pts", 0o755, dir_fd=devfd)
            os.mkdir("shm", 0o1777, dir_fd=devfd)
        finally:
            os.umask(old)
        ptsfd = linux.openat2(devfd, "pts", os.O_PATH | os.O_DIRECTORY, linux.RESOLVE_NO_SYMLINKS)
        mfd = linux.fsmount_new(
            "devpts", DEVPTS_OPTIONS, linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NOEXEC
        )
        _attach(stack, mfd, ptsfd, "devpts on dev/pts")
        shmfd = linux.openat2(devfd, "shm", os.O_PATH | os.O_DIRECTORY, linux.RESOLVE_NO_SYMLINKS)
        mfd = linux.fsmount_new("tmpfs", {"mode": "1777"}, _NOSUID_NODEV_NOEXEC)
        _attach(stack, mfd, shmfd, "tmpfs on dev/shm")
    finally:
        os.close(devfd)


def mount_portage_tmp(stack: ExitStack, rootfd: int, size: str, uid: int, gid: int) -> None:
    """tmpfs on /var/tmp/portage, where emerge builds; exec allowed, devices and suid not."""
    os.close(
        _new_fs(
            stack,
            rootfd,
            "var/tmp/portage",
            "tmpfs",
            {"size": size, "mode": "775", "uid": str(uid), "gid": str(gid)},
            linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV,
        )
    )


def bind_mount(stack: ExitStack, rootfd: int, bind: Bind) -> None:
    """Bind a host path into the root, recursively; read-only all the way down if asked."""
    mfd = linux.open_tree_clone(linux.AT_FDCWD, bind.source, recursive=True)
    try:
        if bind.readonly:
            linux.mount_setattr_fd(mfd, linux.MOUNT_ATTR_RDONLY, recursive=True, what=bind.source)
        if stat.S_ISDIR(os.fstat(mfd).st_mode):
            targetfd = makedirs_in_root(rootfd, bind.target)
        else:
            targetfd = _file_in_root(rootfd, bind.target)
    except BaseException:
        os.close(mfd)
        raise
    os.close(_attach(stack, mfd, targetfd, f"{bind.source} on {bind.target}"))


@dataclass(frozen=True)
class ImageMount:
    """A filesystem image (a repository snapshot) mounted read-only in the root.

    source is the daemon's image file, target a directory in the root.
    """

    source: str
    target: str
    fstype: str = "squashfs"


# <linux/loop.h>
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
# struct loop_config: fd, block_size, struct loop_info64, __u64 reserved[8]
_LOOP_CONFIG = struct.Struct("=II QQQQQ IIII 64s64s32s QQ 8Q")
IMAGE_FSTYPES = frozenset({"squashfs", "erofs"})


def attach_loop(image: str, *, attempts: int = 64) -> tuple[int, str]:
    """A read-only, auto-clearing loop device over image: (fd on it, its /dev path).

    LO_FLAGS_AUTOCLEAR makes the kernel detach the device when its last
    user goes: the fd returned here and then the mount made on it. Made in
    a job's namespace, the device therefore disappears with the job, even
    when the daemon is killed. LOOP_CONFIGURE attaches and sets the flags
    in one step, so no window exists in which the device is attached but
    would not clear itself.
    """
    backing = os.open(image, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(backing).st_mode):
            raise MountError(f"{image} is not a regular file", image=image)
        name = os.fsencode(image)[:63]
        config = _LOOP_CONFIG.pack(
            backing,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
            name,
            b"",
            b"",
            0,
            0,
            *([0] * 8),
        )
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(attempts):
                number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
                dev = f"/dev/loop{number}"
                lfd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    fcntl.ioctl(lfd, LOOP_CONFIGURE, config)
                except OSError as e:
                    os.close(lfd)
                    if e.errno == errno.EBUSY:  # another job took it between the two calls
                        continue
                    raise
                return lfd, dev
        finally:
            os.close(ctl)
    finally:
        os.close(backing)
    raise MountError(f"no free loop device for {image} after {attempts} tries", image=image)


def mount_image(stack: ExitStack, rootfd: int, image: ImageMount) -> None:
    """Loop-mount an image read-only (nosuid, nodev) at image.target in the root."""
    if image.fstype not in IMAGE_FSTYPES:
        raise MountError(f"{image.fstype!r} is not an image type this daemon mounts")
    lfd, dev = attach_loop(image.source)
    try:
        targetfd = makedirs_in_root(rootfd, image.target)
        try:
            # "ro" opens the block device read-only (it is a read-only loop);
            # MOUNT_ATTR_RDONLY makes the mount itself refuse writes.
            mfd = linux.fsmount_new(
                image.fstype,
                {"source": dev, "ro": None},
                linux.MOUNT_ATTR_RDONLY | linux.MOUNT_ATTR_NOSUID | linux.MOUNT_ATTR_NODEV,
            )
        except BaseException:
            os.close(targetfd)
            raise
        os.close(_attach(stack, mfd, targetfd, f"{image.source} on {image.target}"))
    finally:
        # The mount holds the device now; with our fd gone, its end detaches it.
        os.close(lfd)


def bind_file_contents(stack: ExitStack, rootfd: int, target: str, data: bytes) -> None:
    """Show `data` read-only at target in the root, without writing to the root.

    The bytes go into a private detached tmpfs, and only that file is bound
    over the root's own (created empty if the root has none). The root keeps
    its own resolv.conf; the job sees the host's.
    """
    tmpfd = linux.fsmount_new("tmpfs", {"size": "64k", "mode": "755"}, _NOSUID_NODEV_NOEXEC)
    try:
        fd = os.open("file", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644, dir_fd=tmpfd)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        mfd = linux.open_tree_clone(tmpfd, "file", recursive=False)
    finally:
        os.close(tmpfd)
    try:
        linux.mount_setattr_fd(mfd, linux.MOUNT_ATTR_RDONLY, recursive=False, what=target)
        targetfd = _file_in_root(rootfd, target)
    except BaseException:
        os.close(mfd)
        raise
    os.close(_attach(stack, mfd, targetfd, target))


# --- the host namespace: mountinfo ------------------------------------------


@dataclass(frozen=True)
class MountInfo:
    mount_id: int
    parent_id: int
    dev: str
    root: str
    mount_point: str
    options: tuple[str, ...]
    optional: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...] = field(default=())


def unescape(field_: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    if "\\" not in field_:
        return field_
    out = bytearray()
    raw = os.fsencode(field_)
    i = 0
    while i < len(raw):
        chunk = raw[i + 1 : i + 4]
        if raw[i] == 0x5C and len(chunk) == 3 and all(0x30 <= c <= 0x37 for c in chunk):
            out.append(int(chunk, 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def parse_mountinfo_text(text: str) -> list[MountInfo]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        a = left.split(" ")
        b = right.split(" ")
        if not sep or len(a) < 6 or len(b) < 2:
            continue
        mounts.append(
            MountInfo(
                mount_id=int(a[0]),
                parent_id=int(a[1]),
                dev=a[2],
                root=unescape(a[3]),
                mount_point=unescape(a[4]),
                options=tuple(a[5].split(",")),
                optional=tuple(a[6:]),
                fstype=b[0],
                source=unescape(b[1]),
                super_options=tuple(b[2].split(",")) if len(b) > 2 else (),
            )
        )
    return mounts


def parse_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountInfo]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo_text(f.read())


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _tree_depth(mounts: list[MountInfo]) -> dict[int, int]:
    """Depth of each mount in the mount tree: children (and mounts stacked on
    top, whose parent is the mount they cover) are always deeper."""
    by_id = {m.mount_id: m for m in mounts}
    depth: dict[int, int] = {}

    def of(mid: int, seen: frozenset[int] = frozenset()) -> int:
        if mid in depth:
            return depth[mid]
        m = by_id.get(mid)
        if m is None or m.parent_id == mid or mid in seen:
            return 0
        d = of(m.parent_id, seen | {mid}) + 1
        depth[mid] = d
        return d

    for m in mounts:
        of(m.mount_id)
    return depth


def mounts_under(
    path: str, *, include_root: bool = False, mountinfo: list[MountInfo] | None = None
) -> list[MountInfo]:
    """Mounts at or below path (the root's own mount only if include_root), deepest first.

    path is resolved once with realpath; mount points are compared as the
    strings the kernel reports, never through the filesystem.
    """
    top = os.path.realpath(path)
    mounts = parse_mountinfo() if mountinfo is None else mountinfo
    depth = _tree_depth(mounts)
    found = [
        m for m in mounts if _under(m.mount_point, top) and (include_root or m.mount_point != top)
    ]
    found.sort(key=lambda m: (depth.get(m.mount_id, 0), m.mount_point.count("/")), reverse=True)
    return found


def is_mountpoint(path: str) -> bool:
    """True when something is mounted at path (bind mounts of the same fs included)."""
    top = os.path.realpath(path)
    return any(m.mount_point == top for m in parse_mountinfo())


# --- the host namespace: who holds a mount ----------------------------------


@dataclass(frozen=True)
class Holder:
    pid: int
    comm: str
    how: str  # cwd, root, exe, fd N, map

    def __str__(self) -> str:
        return f"{self.comm}[{self.pid}] ({self.how})"


def _links(pid: str) -> Iterator[tuple[str, str]]:
    base = f"/proc/{pid}"
    for what in ("cwd", "root", "exe"):
        with contextlib.suppress(OSError):
            yield what, os.readlink(f"{base}/{what}")
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"{base}/fd"):
            with contextlib.suppress(OSError):
                yield f"fd {fd}", os.readlink(f"{base}/fd/{fd}")
    with (
        contextlib.suppress(OSError),
        open(f"{base}/maps", encoding="utf-8", errors="surrogateescape") as f,
    ):
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                yield "map", parts[5].rstrip("\n")


def holders(mount_point: str) -> list[Holder]:
    """A small fuser: processes whose cwd, root, exe, open files or maps are under it."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        for how, target in _links(pid):
            target = target.removesuffix(" (deleted)")
            if _under(target, mount_point):
                try:
                    with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                found.append(Holder(int(pid), comm, how))
                break
    return found


# --- the host namespace: cleanup ---------------------------------------------


def _mount_point_fds(rootfd: int, top: str, mp: str) -> tuple[int, str]:
    """(O_PATH fd on the mount point's parent directory, last component).

    mountinfo paths hold no symlinks, so any symlink met here means the
    tree changed under us: refuse it rather than unmount somewhere else.
    """
    rel = os.path.relpath(mp, top)
    parent, _, name = rel.rpartition("/")
    pfd = linux.openat2(
        rootfd,
        parent or ".",
        os.O_PATH | os.O_DIRECTORY,
        linux.RESOLVE_BENEATH | linux.RESOLVE_NO_SYMLINKS,
    )
    return pfd, name


def _make_private(rootfd: int, top: str, mp: str) -> None:
    """Take the mount at mp out of any peer group.

    Removing a mount propagates to the peers of its *parent*: with ROOT/dev
    an rbind of a shared /dev, unmounting ROOT/dev/pts would unmount the
    host's /dev/pts too (the old scripts' bug). So every mount under the
    root is made private before any of them is unmounted.
    """
    pfd, name = _mount_point_fds(rootfd, top, mp)
    try:
        mfd = linux.openat2(pfd, name, os.O_PATH, linux.RESOLVE_BENEATH | linux.RESOLVE_NO_SYMLINKS)
    finally:
        os.close(pfd)
    try:
        linux.mount(None, linux.fd_path(mfd), None, linux.MS_PRIVATE)
    finally:
        os.close(mfd)


def _unmount_one(rootfd: int, top: str, mp: str) -> None:
    pfd, name = _mount_point_fds(rootfd, top, mp)
    try:
        # Through the pinned parent directory nothing can be swapped under
        # us; UMOUNT_NOFOLLOW covers the last component. (An O_PATH fd on
        # the mount itself would keep it busy.)
        linux.umount2(f"{linux.fd_path(pfd)}/{name}", linux.UMOUNT_NOFOLLOW)
    finally:
        os.close(pfd)


def _busy_error(busy: list[str]) -> MountBusy:
    first = busy[0]
    held = holders(first)
    who = ", ".join(str(h) for h in held) or "no process found (another mount namespace?)"
    return MountBusy(
        f"{first} is busy, held by {who}; stop it and run cleanup again",
        mount=first,
        holders=[{"pid": h.pid, "comm": h.comm, "how": h.how} for h in held],
        busy=busy,
    )


def _cleanup_below(top: str) -> list[str]:
    """Unmount everything strictly below top; one pass per layer uncovered."""
    rootfd = os.open(top, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    removed: list[str] = []
    try:
        while True:
            left = mounts_under(top)
            if not left:
                return removed
            for m in reversed(left):  # parents first; hidden ones fail now and come back
                with contextlib.suppress(OSError):
                    _make_private(rootfd, top, m.mount_point)
            progress = False
            busy: list[str] = []
            failed: list[str] = []
            for m in left:
                try:
                    _unmount_one(rootfd, top, m.mount_point)
                except OSError as e:
                    if e.errno == errno.EBUSY:
                        busy.append(m.mount_point)
                    elif e.errno not in (errno.EINVAL, errno.ENOENT):
                        # EINVAL/ENOENT: hidden under another mount for now,
                        # or already gone; the next pass sees it again.
                        failed.append(f"{m.mount_point}: {e.strerror}")
                    continue
                removed.append(m.mount_point)
                progress = True
            if progress:
                continue
            if busy:
                raise _busy_error(busy)
            shown = "; ".join(failed) or ", ".join(m.mount_point for m in left)
            raise MountError(
                f"cannot unmount under {top}: {shown}", mounts=[m.mount_point for m in left]
            )
    finally:
        os.close(rootfd)


def cleanup_under_sync(path: str, *, include_root: bool = False) -> list[str]:
    """Unmount everything under path, deepest first, until mountinfo shows none.

    The root's own mount (a dataset, a subvolume) is the storage backend's
    and is kept unless include_root. Returns the mount points removed, in
    order. Raises MountBusy naming the mount and the processes holding it
    when one will not go; never touches a mount outside path.
    """
    top = os.path.realpath(path)
    removed = _cleanup_below(top)
    while include_root and is_mountpoint(top):
        try:
            linux.mount(None, top, None, linux.MS_PRIVATE)
            linux.umount2(top, linux.UMOUNT_NOFOLLOW)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise _busy_error([top]) from None
            raise MountError(f"cannot unmount {top}: {e.strerror}", mounts=[top]) from None
        removed.append(top)
        # A mount that was stacked under it may have its own children.
        removed += _cleanup_below(top)
    return removed


async def cleanup_under(path: str, *, include_root: bool = False) -> list[str]:
    """cleanup_under_sync off the event loop (unmounting can block on a slow fs).

    The worker thread only unmounts in the host namespace, which is the
    daemon's own: no namespace is changed there.
    """
    # Imported here: the fork server imports this module and must stay small.
    import asyncio

    return await asyncio.to_thread(cleanup_under_sync, path, include_root=include_root)
