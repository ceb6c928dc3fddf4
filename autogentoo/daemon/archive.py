"""Import a stage3 tarball into a fresh tree, refusing anything that could leave it.

Two passes. The scan reads the whole archive with Python's tarfile (streaming,
in a thread, the decompressor in a child process) and checks every member
against the rules below before a single byte is written. Only then does GNU tar
extract it the way the Gentoo handbook does (numeric owners, permissions,
xattrs, hence file capabilities), into an existing empty directory.

Why GNU tar and not tarfile.extractall: tar is what catalyst and the handbook
use, it restores xattrs/ACLs and capabilities correctly, and it is fast. Why
the scan: tar alone would still create symlinks pointing out, device nodes,
and would happily unpack a decompression bomb until the disk is full.

The tarball must live where only the daemon can write it (its upload store):
both passes read the same file, and a change between them is detected (inode
and ctime) but only after the fact.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from autogentoo.daemon import faults
from autogentoo.daemon.mounts import mounts_under
from autogentoo.daemon.run import BASE_ENV, ENOSPC_MARKERS, run
from autogentoo.errors import (
    CommandFailed,
    Conflict,
    InvalidArgument,
    MountBusy,
    NoSpace,
    UnsafeArchive,
)

Progress = Callable[[int, int], None]
PROGRESS_INTERVAL = 1.0  # seconds between looks at how far tar has read

# Linux follows at most this many symlinks in one lookup (MAXSYMLINKS).
MAX_SYMLINK_HOPS = 40
# Bytes of tar headers (pax/GNU long names, xattrs) allowed for one member;
# tarfile reads them into memory whole, so they are bounded separately.
MAX_HEADER_BYTES = 8 << 20

# (magic, offset, name, decompressor argv)
_FORMATS: tuple[tuple[bytes, int, str, tuple[str, ...]], ...] = (
    (b"\xfd7zXZ\x00", 0, "xz", ("xz", "--decompress", "--stdout", "--threads=0")),
    (b"\x28\xb5\x2f\xfd", 0, "zst", ("zstd", "--decompress", "--stdout", "--quiet")),
    (b"\x1f\x8b", 0, "gz", ("gzip", "--decompress", "--stdout")),
    (b"BZh", 0, "bz2", ("bzip2", "--decompress", "--stdout")),
    (b"\x04\x22\x4d\x18", 0, "lz4", ("lz4", "--decompress", "--stdout")),
    (b"ustar", 257, "tar", ()),
)

# The device nodes a stage3 may carry: the ones a chroot needs before devtmpfs
# or our minimal /dev is mounted over it. Anything else (a block device above
# all: /dev/sda in a root is the host's disk) is refused.
ALLOWED_DEVICES: dict[str, tuple[int, int]] = {
    "dev/null": (1, 3),
    "dev/zero": (1, 5),
    "dev/full": (1, 7),
    "dev/random": (1, 8),
    "dev/urandom": (1, 9),
    "dev/tty": (5, 0),
    "dev/console": (5, 1),
    "dev/ptmx": (5, 2),
}

# Where a setuid/setgid program is ordinary in a Gentoo root (su, passwd,
# mount, ssh-keysign under /usr/lib*/misc, dbus's launch helper under libexec).
# A set-id file anywhere else (tmp, home, etc, var, dev) has no business in a
# stage3, and those are the places a later unprivileged user could reach it by
# a path nobody audits.
SETID_DIRS = (
    "bin/",
    "sbin/",
    "lib/",
    "lib32/",
    "lib64/",
    "usr/bin/",
    "usr/sbin/",
    "usr/lib/",
    "usr/lib32/",
    "usr/lib64/",
    "usr/libexec/",
    "usr/local/bin/",
    "usr/local/sbin/",
    "opt/",
)

_REG, _DIR, _SYM, _HARD, _OTHER = range(5)


@dataclass(frozen=True)
class ExtractStats:
    members: int
    content_bytes: int  # sum of regular file sizes: what lands on disk
    compressed_bytes: int
    compression: str
    scan_seconds: float
    extract_seconds: float


@dataclass(frozen=True)
class _ScanResult:
    members: int
    content_bytes: int


class _TooBig(Exception):
    """Raised inside tarfile's reads when the decompressed stream runs over a limit."""


class _CountingReader:
    """The decompressed stream as tarfile sees it, with a running byte count."""

    def __init__(self, raw: IO[bytes], limit: int, stop: threading.Event) -> None:
        self.raw = raw
        self.consumed = 0
        self.limit = limit
        self.stop = stop

    def read(self, size: int = -1) -> bytes:
        if self.stop.is_set():
            raise _TooBig("cancelled")
        data = self.raw.read(size)
        self.consumed += len(data)
        if self.consumed > self.limit:
            raise _TooBig(f"more than {self.limit} bytes of headers for one member")
        return data


def sniff(path: Path) -> tuple[str, tuple[str, ...]]:
    """The compression of a tarball, from its magic bytes, and how to undo it."""
    with open(path, "rb") as f:
        head = f.read(512)
    for magic, offset, name, argv in _FORMATS:
        if head[offset : offset + len(magic)] == magic:
            return name, argv
    raise InvalidArgument(
        f"not a valid tar archive: {path.name} is neither a tar file nor compressed with "
        "xz, zstd, gzip, bzip2 or lz4",
        file=path.name,
    )


def _norm(untrusted_name: str, what: str, member: str) -> str:
    """A member name as a clean relative path ('' is the root); refuses / and .."""
    if untrusted_name.startswith("/"):
        raise UnsafeArchive(
            f"member {member!r}: absolute {what} {untrusted_name!r}", member=member, rule="absolute"
        )
    parts = [p for p in untrusted_name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(
            f"member {member!r}: '..' in {what} {untrusted_name!r}", member=member, rule="dotdot"
        )
    return "/".join(parts)


def _parents(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _climbs_out(link_name: str, target: str) -> bool:
    """Does a relative target go above the root, read from the link's directory?"""
    depth = link_name.count("/")  # components of the link's directory
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


class _Scanner:
    def __init__(self, max_bytes: int, max_members: int) -> None:
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.kinds: dict[str, int] = {"": _DIR}
        self.symlinks: dict[str, str] = {}
        self.members = 0
        self.content_bytes = 0

    def check(self, info: tarfile.TarInfo) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise UnsafeArchive(
                f"more than {self.max_members} members; refusing the archive",
                rule="max_members",
            )
        raw = info.name
        name = _norm(raw, "path", raw)
        for parent in _parents(name):
            kind = self.kinds.get(parent)
            if kind is None:
                self.kinds[parent] = _DIR  # tar will create it as a directory
            elif kind == _SYM:
                raise UnsafeArchive(
                    f"member {raw!r} goes through {parent!r}, which the archive made a "
                    "symlink (a file could be written through it, outside the root)",
                    member=raw,
                    rule="through_symlink",
                )
            elif kind != _DIR:
                raise UnsafeArchive(
                    f"member {raw!r}: {parent!r} is not a directory",
                    member=raw,
                    rule="through_file",
                )

        kind = self._kind(info, raw, name)
        earlier = self.kinds.get(name)
        if earlier is not None and not (earlier == _DIR and kind == _DIR):
            raise UnsafeArchive(
                f"member {raw!r} appears twice or replaces an earlier member",
                member=raw,
                rule="duplicate",
            )
        self.kinds[name] = kind
        if kind == _SYM:
            self.symlinks[name] = info.linkname
        if info.isreg():
            self.content_bytes += info.size
            if self.content_bytes > self.max_bytes:
                raise UnsafeArchive(
                    f"the archive unpacks to more than {self.max_bytes} bytes (at member "
                    f"{raw!r}); refusing it as a decompression bomb or an oversized root",
                    member=raw,
                    rule="max_bytes",
                )
        for key in info.pax_headers:
            # overlayfs and other kernel users trust trusted.* xattrs; no stage3 has them.
            if key.startswith("SCHILY.xattr.trusted."):
                raise UnsafeArchive(
                    f"member {raw!r} carries a trusted.* xattr ({key[13:]})",
                    member=raw,
                    rule="xattr",
                )

    def _kind(self, info: tarfile.TarInfo, raw: str, name: str) -> int:
        setid = info.mode & (stat.S_ISUID | stat.S_ISGID)
        if info.isdir():
            if info.mode & stat.S_ISUID:
                # setgid on a directory is normal (group-shared dirs); setuid means nothing
                # on Linux directories and only shows up in crafted archives.
                raise UnsafeArchive(f"member {raw!r}: setuid directory", member=raw, rule="setid")
            return _DIR
        if name == "":
            raise UnsafeArchive(
                f"member {raw!r}: the archive root must be a directory", member=raw, rule="root"
            )
        if info.issym():
            # An absolute target is fine: it resolves inside the root once chrooted,
            # the daemon only ever follows links in a root through pathsafe
            # (RESOLVE_IN_ROOT), and tar never writes through one (through_symlink).
            # A relative one that climbs above the root would lead whoever follows it
            # from outside the chroot into the host.
            if not info.linkname.startswith("/") and _climbs_out(name, info.linkname):
                raise UnsafeArchive(
                    f"member {raw!r}: symlink target {info.linkname!r} climbs out of the root",
                    member=raw,
                    rule="symlink_escape",
                )
            return _SYM
        if info.islnk():
            target = _norm(info.linkname, "hardlink target", raw)
            if self.kinds.get(target) != _REG:
                raise UnsafeArchive(
                    f"member {raw!r}: hardlink to {info.linkname!r}, which is not an earlier "
                    "regular file in the archive",
                    member=raw,
                    rule="hardlink",
                )
            return _HARD
        if info.isreg():
            if setid:
                if info.mode & stat.S_IWOTH:
                    raise UnsafeArchive(
                        f"member {raw!r}: world-writable setuid/setgid file",
                        member=raw,
                        rule="setid",
                    )
                if not name.startswith(SETID_DIRS):
                    raise UnsafeArchive(
                        f"member {raw!r}: setuid/setgid file outside the usual program directories",
                        member=raw,
                        rule="setid",
                    )
            return _REG
        if info.isfifo():
            if setid:
                raise UnsafeArchive(f"member {raw!r}: setuid/setgid FIFO", member=raw, rule="setid")
            return _OTHER
        if info.ischr() or info.isblk():
            allowed = ALLOWED_DEVICES.get(name)
            numbers = (info.devmajor, info.devminor)
            if not info.ischr() or allowed != numbers or setid:
                kind = "char" if info.ischr() else "block"
                raise UnsafeArchive(
                    f"member {raw!r}: {kind} device {numbers[0]}:{numbers[1]} is not one a "
                    f"stage3 may carry (allowed: {', '.join(sorted(ALLOWED_DEVICES))} with "
                    "their standard numbers)",
                    member=raw,
                    rule="device",
                )
            return _OTHER
        raise UnsafeArchive(
            f"member {raw!r}: unsupported member type {info.type!r}", member=raw, rule="type"
        )

    def check_symlink_chains(self) -> None:
        """Resolve every symlink the way the kernel would, within the archive's own links.

        Refuses chains longer than the kernel follows and relative chains that end
        up above the root (each link alone may look harmless: a/l -> .., then
        b -> a/l/..). Memoised, so the cost is linear in the number of links.
        """
        memo: dict[str, tuple[list[str], int, bool] | None] = {}

        def too_long(link: str) -> UnsafeArchive:
            return UnsafeArchive(
                f"symlink {link!r} starts a chain of more than {MAX_SYMLINK_HOPS} links",
                member=link,
                rule="symlink_chain",
            )

        def resolve(link: str, depth: int) -> tuple[list[str], int, bool]:
            if depth > MAX_SYMLINK_HOPS:
                raise too_long(link)
            if link in memo:
                done = memo[link]
                if done is None:
                    raise UnsafeArchive(
                        f"symlink {link!r} is part of a loop", member=link, rule="symlink_chain"
                    )
                return done
            memo[link] = None
            target = self.symlinks[link]
            absolute = target.startswith("/")
            start = [] if absolute else link.split("/")[:-1]
            path, hops, via_abs = walk(start, target.split("/"), absolute, link, depth)
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise too_long(link)
            memo[link] = (path, hops, via_abs)
            return path, hops, via_abs

        def walk(
            cur: list[str], parts: list[str], absolute: bool, link: str, depth: int
        ) -> tuple[list[str], int, bool]:
            cur = list(cur)
            hops = 0
            for part in parts:
                if part in ("", "."):
                    continue
                if part == "..":
                    if not cur:
                        if not absolute:
                            raise UnsafeArchive(
                                f"symlink {link!r} leads out of the root through other links",
                                member=link,
                                rule="symlink_escape",
                            )
                        continue
                    cur.pop()
                    continue
                cur.append(part)
                here = "/".join(cur)
                if here in self.symlinks:
                    path, sub_hops, sub_abs = resolve(here, depth + 1)
                    hops += sub_hops
                    if hops > MAX_SYMLINK_HOPS:
                        raise too_long(link)
                    cur = list(path)
                    absolute = absolute or sub_abs
            return cur, hops, absolute

        for link in self.symlinks:
            resolve(link, 0)


def _scan(
    tarball_fd: int,
    compressed_size: int,
    decompressor: tuple[str, ...],
    max_bytes: int,
    max_members: int,
    report: Callable[[int], None],
    stop: threading.Event,
) -> _ScanResult:
    scanner = _Scanner(max_bytes, max_members)
    proc: subprocess.Popen[bytes] | None = None
    raw: IO[bytes]
    # run() collects output whole; this is the one place that must stream a
    # child's stdout, so it follows run()'s rules by hand: argv only, the fixed
    # environment, its own session, always killed and reaped.
    if decompressor:
        proc = subprocess.Popen(
            decompressor,
            stdin=tarball_fd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(BASE_ENV),
            start_new_session=True,
        )
        assert proc.stdout is not None
        raw = proc.stdout
    else:
        raw = os.fdopen(os.dup(tarball_fd), "rb", buffering=0)
    reader = _CountingReader(raw, MAX_HEADER_BYTES, stop)
    failure: BaseException | None = None
    err = b""
    try:
        with tarfile.open(
            fileobj=reader,  # type: ignore[call-overload]
            mode="r|",
            bufsize=1 << 20,
            encoding="utf-8",
            errors="surrogateescape",
        ) as tf:
            last = 0
            while (info := tf.next()) is not None:
                scanner.check(info)
                tf.members.clear()  # stream mode keeps every TarInfo otherwise
                # this member's data is skipped next, then the next member's headers
                reader.limit = reader.consumed + info.size + MAX_HEADER_BYTES
                pos = os.lseek(tarball_fd, 0, os.SEEK_CUR)  # offset shared with the child
                if pos - last >= compressed_size // 200 + 1:
                    last = pos
                    report(pos)
        scanner.check_symlink_chains()
    except _TooBig as e:
        failure = e
        if stop.is_set():
            raise asyncio.CancelledError from None
        raise UnsafeArchive(f"a member's headers are too large: {e}", rule="header") from None
    except BaseException as e:
        failure = e
        if not isinstance(e, (tarfile.TarError, EOFError, OSError)):
            raise
    finally:
        if proc is not None:
            if failure is None:
                # Let the decompressor finish what follows the end-of-archive marker
                # (record padding), but not a flood of trailing data.
                with contextlib.suppress(OSError):
                    for _ in range(16):
                        if not raw.read(1 << 20):
                            break
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        else:
            raw.close()
    decompressor_failed = proc is not None and proc.returncode is not None and proc.returncode > 0
    if failure is not None or decompressor_failed:
        detail = ""
        if decompressor_failed:
            lines = err.decode("utf-8", "replace").strip().splitlines()
            detail = lines[-1] if lines else f"{decompressor[0]} exited with {proc.returncode}"  # type: ignore[union-attr]
        detail = detail or str(failure)
        raise InvalidArgument(f"not a valid tar archive: {detail}", rule="corrupt")
    return _ScanResult(scanner.members, scanner.content_bytes)


def _read_position(ident: tuple[int, int]) -> int | None:
    """How far our descendants (tar, its decompressor) have read the tarball.

    Best effort and cheap: one pass over /proc/*/stat for parent links (the
    kernel here has no /proc/PID/task/TID/children), then the fds of our own
    descendants only. Any process vanishing meanwhile is skipped.
    """
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    ours = {os.getpid()}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                changed = True
    ours.discard(os.getpid())
    best: int | None = None
    for pid in ours:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                    if (st.st_dev, st.st_ino) != ident:
                        continue
                    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                        pos = int(f.readline().split()[1])
                    best = pos if best is None else max(best, pos)
    return best


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_ctime_ns) == (
        b.st_dev,
        b.st_ino,
        b.st_size,
        b.st_ctime_ns,
    )


async def extract_stage3(
    tarball: Path,
    dest: Path,
    *,
    max_bytes: int,
    max_members: int = 2_000_000,
    on_progress: Progress | None = None,
) -> ExtractStats:
    """Check tarball member by member, then extract it into the empty directory dest.

    Raises UnsafeArchive (naming the member and the rule), InvalidArgument for
    data that is not a tar archive, NoSpace when the filesystem fills up. On
    failure dest may hold a partial tree: removing it is the caller's job
    (remove_tree). on_progress(done, total) is called on the event loop: the
    scan covers the first half of total, extraction the second.
    """
    loop = asyncio.get_running_loop()
    _check_empty_dir(dest)
    compression, decompressor = sniff(tarball)
    fd = os.open(tarball, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"not a valid tar archive: {tarball.name} is not a file")
        total = 2 * st.st_size

        def report(pos: int) -> None:
            # Called from the scan thread; its calls all run on the loop before the
            # scan's result does, so the ones made directly below come after them.
            if on_progress is not None:
                loop.call_soon_threadsafe(on_progress, pos, total)

        def report_here(pos: int) -> None:
            if on_progress is not None:
                on_progress(pos, total)

        stop = threading.Event()
        started = time.monotonic()
        try:
            scan = await asyncio.to_thread(
                _scan, fd, st.st_size, decompressor, max_bytes, max_members, report, stop
            )
        except asyncio.CancelledError:
            stop.set()
            raise
        scanned = time.monotonic()
        report_here(st.st_size)
        if not _same_file(st, os.stat(tarball, follow_symlinks=False)):
            raise UnsafeArchive(f"{tarball.name} changed while it was being checked")
        await _tar_extract(
            tarball, dest, (st.st_dev, st.st_ino), lambda pos: report_here(st.st_size + pos)
        )
        if not _same_file(st, os.stat(tarball, follow_symlinks=False)):
            raise UnsafeArchive(f"{tarball.name} changed while it was being extracted")
        report_here(total)
        return ExtractStats(
            members=scan.members,
            content_bytes=scan.content_bytes,
            compressed_bytes=st.st_size,
            compression=compression,
            scan_seconds=scanned - started,
            extract_seconds=time.monotonic() - scanned,
        )
    finally:
        os.close(fd)


def _check_empty_dir(dest: Path) -> None:
    try:
        st = os.stat(dest, follow_symlinks=False)
    except FileNotFoundError:
        raise InvalidArgument(f"extraction target {dest} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"extraction target {dest} is not a directory")
    with os.scandir(dest) as it:
        if next(it, None) is not None:
            raise Conflict(f"extraction target {dest} is not empty")


async def _tar_extract(
    tarball: Path, dest: Path, ident: tuple[int, int], on_pos: Callable[[int], None]
) -> None:
    argv = [
        "tar",
        "--extract",
        "--numeric-owner",
        "--same-owner",
        "--preserve-permissions",
        "--xattrs",
        "--xattrs-include=*.*",
        "--acls",
        "-C",
        str(dest),
        "-f",
        str(tarball),
    ]
    task = asyncio.ensure_future(run(argv, check=False, capture=False))
    try:
        await faults.point("import.extracting")
        while True:
            done, _ = await asyncio.wait({task}, timeout=PROGRESS_INTERVAL)
            if done:
                break
            pos = _read_position(ident)
            if pos is not None:
                on_pos(pos)
        result = task.result()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if result.returncode == 0:
        return
    err = result.stderr.decode("utf-8", "replace")
    lines = err.strip().splitlines()
    if any(marker in err for marker in ENOSPC_MARKERS):
        raise NoSpace(
            f"no space left while extracting {tarball.name} into {dest}",
            command="tar",
            path=str(dest),
        )
    raise CommandFailed(
        f"tar failed extracting {tarball.name} (status {result.returncode}): "
        + " / ".join(lines[-5:]),
        command="tar",
        returncode=result.returncode,
    )


async def remove_tree(path: Path) -> None:
    """Delete a (partial) root: never follows a symlink, never crosses into a mount.

    rm -r unlinks symlinks rather than following them; --one-file-system
    refuses to descend into anything mounted below path, which is reported
    as MountBusy so nothing of a host bind mount is ever deleted.
    """
    if not path.is_absolute() or path == Path("/") or ".." in path.parts:
        raise InvalidArgument(f"refusing to remove {path}: not a clean absolute path")
    if not os.path.lexists(path):
        return
    # --one-file-system only compares st_dev, so it walks straight into a bind
    # mount of the same filesystem: refuse while anything is mounted below.
    mounted = [m.mount_point for m in mounts_under(str(path), include_root=True)]
    if mounted:
        raise MountBusy(
            f"cannot remove {path}: still mounted inside it: {', '.join(mounted)}",
            path=str(path),
            mounts=mounted,
        )
    result = await run(
        ["rm", "-r", "-f", "--one-file-system", "--preserve-root=all", "--", str(path)],
        check=False,
    )
    if result.returncode != 0:
        err = result.stderr.decode("utf-8", "replace").strip()
        if "different device" in err:
            raise MountBusy(
                f"cannot remove {path}: something is mounted inside it ({err})", path=str(path)
            )
        raise CommandFailed(
            f"rm -r {path} failed: {err}", command="rm", returncode=result.returncode
        )
