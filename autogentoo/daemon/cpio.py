"""The newc ("070701") cpio format: headers, padding, trailer, and a writer.

Only the format lives here; what goes into an archive, and in which order,
is packroot.py's business. Conventions that both readers we care about
(the kernel's init/initramfs.c and GNU cpio) agree on:

- A header is 110 ASCII bytes, the name follows with its NUL, and header
  plus name are padded with NULs to a multiple of 4; so is the data.
- The archive's own device fields (devmajor/devminor) are 0 and inode
  numbers are the caller's (normalised, sequential): the kernel keys its
  hardlink table on (devmajor, devminor, ino, file type), GNU cpio on
  (dev, ino).
- Hardlinks: every entry of a group carries the same ino and the group's
  nlink; only the LAST entry carries the data, the others have size 0. The
  kernel links later names to the first and writes the data through the
  last one without O_TRUNC; GNU cpio defers size-0 members until the data
  arrives. The entries need not be consecutive. The kernel forgets its
  hardlink table at each TRAILER!!!, so a group never spans archives.
- A symlink's target is its data. Checksums are 0 (newc, not crc).
- The archive ends with a TRAILER!!! entry and is padded to 512 bytes, as
  GNU cpio does; the kernel skips NUL padding between concatenated archives.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

MAGIC = b"070701"
HEADER_LEN = 110
TRAILER = b"TRAILER!!!"
BLOCK = 512

# Files up to this size are read into the write buffer (one read, batched
# writes); larger ones are spliced into the output by the kernel.
SMALL_FILE = 128 * 1024
BUFFER = 1 << 20


def pad4(n: int) -> int:
    return (4 - n % 4) % 4


def header(
    *,
    ino: int,
    mode: int,
    uid: int,
    gid: int,
    nlink: int,
    mtime: int,
    size: int,
    rdevmajor: int = 0,
    rdevminor: int = 0,
    name: bytes,
) -> bytes:
    """The header, name, NUL and padding of one entry (the data follows)."""
    if b"\0" in name:
        raise ValueError(f"cpio names cannot contain NUL: {name!r}")
    namesize = len(name) + 1
    head = b"070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X" % (
        ino,
        mode,
        uid,
        gid,
        nlink,
        max(mtime, 0),
        size,
        0,  # devmajor: the archive's own, normalised
        0,  # devminor
        rdevmajor,
        rdevminor,
        namesize,
        0,  # check
    )
    return head + name + b"\0" * (1 + pad4(HEADER_LEN + namesize))


class DataChanged(Exception):
    """A file held less data than its header announced (changed under us)."""


class NewcWriter:
    """Stream newc entries to a file descriptor (a pipe or a regular file).

    Headers and small files are batched in a buffer; large file bodies go
    fd-to-fd with sendfile(2) (or splice(2) into a pipe) without passing
    through Python. `written` counts every byte handed to `out_fd`.
    """

    def __init__(self, out_fd: int) -> None:
        self._fd = out_fd
        self._buf = bytearray()
        self.written = 0
        self.entries = 0
        self._sendfile_ok = True

    # -- entries ------------------------------------------------------------

    def add(
        self,
        name: bytes,
        *,
        ino: int,
        mode: int,
        uid: int = 0,
        gid: int = 0,
        nlink: int = 1,
        mtime: int = 0,
        rdev: int = 0,
        data: bytes = b"",
    ) -> None:
        """An entry whose data (if any) is given in memory: dirs, links, nodes."""
        rmaj, rmin = (os.major(rdev), os.minor(rdev)) if rdev else (0, 0)
        self._buf += header(
            ino=ino,
            mode=mode,
            uid=uid,
            gid=gid,
            nlink=nlink,
            mtime=mtime,
            size=len(data),
            rdevmajor=rmaj,
            rdevminor=rmin,
            name=name,
        )
        if data:
            self._buf += data
            self._buf += b"\0" * pad4(len(data))
        self.entries += 1
        self._maybe_flush()

    def add_file(
        self,
        name: bytes,
        *,
        ino: int,
        mode: int,
        uid: int,
        gid: int,
        nlink: int,
        mtime: int,
        size: int,
        src_fd: int | None,
    ) -> None:
        """A regular file whose `size` bytes are read from `src_fd` (from offset 0).

        size 0 with src_fd None is a hardlink member without the data.
        Raises DataChanged if the file ends early.
        """
        self._buf += header(
            ino=ino, mode=mode, uid=uid, gid=gid, nlink=nlink, mtime=mtime, size=size, name=name
        )
        self.entries += 1
        if size:
            assert src_fd is not None
            if size <= SMALL_FILE:
                self._read_into_buffer(src_fd, size)
            else:
                self._flush()
                self._copy_fd(src_fd, size)
            self._buf += b"\0" * pad4(size)
        self._maybe_flush()

    def finish(self) -> int:
        """Write the trailer and the padding to 512; return the archive size."""
        self._buf += header(ino=0, mode=0, uid=0, gid=0, nlink=1, mtime=0, size=0, name=TRAILER)
        total = self.written + len(self._buf)
        self._buf += b"\0" * ((BLOCK - total % BLOCK) % BLOCK)
        self._flush()
        return self.written

    # -- plumbing -----------------------------------------------------------

    def _read_into_buffer(self, src_fd: int, size: int) -> None:
        got = 0
        while got < size:
            chunk = os.read(src_fd, size - got)
            if not chunk:
                raise DataChanged(f"file ended after {got} of {size} bytes")
            self._buf += chunk
            got += len(chunk)

    def _copy_fd(self, src_fd: int, size: int) -> None:
        offset = 0
        if self._sendfile_ok:
            try:
                while offset < size:
                    n = os.sendfile(self._fd, src_fd, offset, size - offset)
                    if n == 0:
                        raise DataChanged(f"file ended after {offset} of {size} bytes")
                    offset += n
                    self.written += n
                return
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS) or offset:
                    raise
                self._sendfile_ok = False
        os.lseek(src_fd, offset, os.SEEK_SET)
        while offset < size:
            chunk = os.read(src_fd, min(BUFFER, size - offset))
            if not chunk:
                raise DataChanged(f"file ended after {offset} of {size} bytes")
            self._write_all(chunk)
            offset += len(chunk)

    def _maybe_flush(self) -> None:
        if len(self._buf) >= BUFFER:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self._write_all(self._buf)
            self._buf = bytearray()

    def _write_all(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            self.written += n
            view = view[n:]


# --- reading (tests, listings) ------------------------------------------------


@dataclass(frozen=True)
class Entry:
    name: bytes
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    devmajor: int
    devminor: int
    rdevmajor: int
    rdevminor: int
    data: bytes

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def iter_newc(archive: bytes) -> Iterator[Entry]:
    """Parse one uncompressed newc archive (up to its trailer)."""
    pos = 0
    while True:
        head = archive[pos : pos + HEADER_LEN]
        if len(head) < HEADER_LEN or head[:6] != MAGIC:
            raise ValueError(f"bad newc header at offset {pos}")
        f = [int(head[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        namesize, size = f[11], f[6]
        name_start = pos + HEADER_LEN
        name = archive[name_start : name_start + namesize - 1]
        pos = name_start + namesize
        pos += pad4(pos)
        if name == TRAILER:
            return
        data = archive[pos : pos + size]
        pos += size + pad4(size)
        yield Entry(name, f[0], f[1], f[2], f[3], f[4], f[5], f[7], f[8], f[9], f[10], data)
