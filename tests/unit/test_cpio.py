"""The newc writer on its own: header layout, padding, trailer, and GNU cpio reading it."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from autogentoo.daemon import cpio


def _archive(tmp_path: Path, build: object) -> bytes:
    out = tmp_path / "a.cpio"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        w = cpio.NewcWriter(fd)
        build(w)  # type: ignore[operator]
        size = w.finish()
    finally:
        os.close(fd)
    data = out.read_bytes()
    assert len(data) == size
    return data


def test_header_layout() -> None:
    h = cpio.header(ino=1, mode=0o100644, uid=2, gid=3, nlink=1, mtime=4, size=5, name=b"etc/x")
    assert h.startswith(b"070701" + b"00000001" + b"000081A4" + b"00000002" + b"00000003")
    # 110 bytes of header, the name, its NUL, then padding to 4
    assert h[110:116] == b"etc/x\0"
    assert len(h) % 4 == 0
    namesize = int(h[94:102], 16)
    assert namesize == 6


def test_name_with_nul_is_refused() -> None:
    with pytest.raises(ValueError):
        cpio.header(ino=1, mode=0, uid=0, gid=0, nlink=1, mtime=0, size=0, name=b"a\0b")


def test_negative_mtime_is_clamped_to_zero() -> None:
    h = cpio.header(ino=1, mode=0, uid=0, gid=0, nlink=1, mtime=-5, size=0, name=b"a")
    assert h[46:54] == b"00000000"


def test_roundtrip_padding_and_trailer(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * 1000 + b"xyz")  # over SMALL_FILE: sendfile path
    small = tmp_path / "small"
    small.write_bytes(b"hello")

    def build(w: cpio.NewcWriter) -> None:
        w.add(b"d", ino=1, mode=stat.S_IFDIR | 0o755, nlink=2, mtime=7)
        for ino, (name, path) in enumerate(((b"d/small", small), (b"d/big", big)), start=2):
            fd = os.open(path, os.O_RDONLY)
            try:
                w.add_file(
                    name,
                    ino=ino,
                    mode=stat.S_IFREG | 0o4755,
                    uid=0,
                    gid=0,
                    nlink=1,
                    mtime=7,
                    size=path.stat().st_size,
                    src_fd=fd,
                )
            finally:
                os.close(fd)
        w.add(b"d/l", ino=4, mode=stat.S_IFLNK | 0o777, data=b"/etc/shadow")
        w.add(b"d/c", ino=5, mode=stat.S_IFCHR | 0o600, rdev=os.makedev(5, 1))

    data = _archive(tmp_path, build)
    assert len(data) % 512 == 0
    entries = list(cpio.iter_newc(data))
    assert [e.name for e in entries] == [b"d", b"d/small", b"d/big", b"d/l", b"d/c"]
    assert entries[1].data == b"hello"
    assert entries[2].data == big.read_bytes()
    assert entries[1].mode == stat.S_IFREG | 0o4755
    assert entries[3].data == b"/etc/shadow"
    assert (entries[4].rdevmajor, entries[4].rdevminor) == (5, 1)
    assert all(e.devmajor == 0 and e.devminor == 0 for e in entries)
    assert b"TRAILER!!!" in data


def test_data_changed_is_reported(tmp_path: Path) -> None:
    f = tmp_path / "short"
    f.write_bytes(b"abc")
    out = os.open(tmp_path / "o", os.O_WRONLY | os.O_CREAT, 0o600)
    src = os.open(f, os.O_RDONLY)
    try:
        w = cpio.NewcWriter(out)
        with pytest.raises(cpio.DataChanged):
            w.add_file(
                b"short",
                ino=1,
                mode=stat.S_IFREG | 0o644,
                uid=0,
                gid=0,
                nlink=1,
                mtime=0,
                size=10,
                src_fd=src,
            )
    finally:
        os.close(src)
        os.close(out)


def test_gnu_cpio_reads_hardlinks_with_data_last(tmp_path: Path) -> None:
    """Entries of a hardlink group apart in the archive, data on the last one."""
    f = tmp_path / "content"
    f.write_bytes(b"shared data\n")

    def build(w: cpio.NewcWriter) -> None:
        w.add(b"a", ino=1, mode=stat.S_IFDIR | 0o755, nlink=2)
        w.add_file(
            b"a/one",
            ino=2,
            mode=stat.S_IFREG | 0o644,
            uid=0,
            gid=0,
            nlink=2,
            mtime=0,
            size=0,
            src_fd=None,
        )
        w.add(b"b", ino=3, mode=stat.S_IFDIR | 0o755, nlink=2)
        fd = os.open(f, os.O_RDONLY)
        try:
            w.add_file(
                b"b/two",
                ino=2,
                mode=stat.S_IFREG | 0o644,
                uid=0,
                gid=0,
                nlink=2,
                mtime=0,
                size=12,
                src_fd=fd,
            )
        finally:
            os.close(fd)

    data = _archive(tmp_path, build)
    listing = subprocess.run(
        ["cpio", "-it"], input=data, capture_output=True, check=True
    ).stdout.split(b"\n")
    assert listing[:4] == [b"a", b"a/one", b"b", b"b/two"]
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(
        ["cpio", "-id", "--no-absolute-filenames", "--quiet"],
        input=data,
        cwd=dest,
        check=True,
        capture_output=True,
    )
    one, two = dest / "a/one", dest / "b/two"
    assert one.read_bytes() == two.read_bytes() == b"shared data\n"
    assert one.stat().st_ino == two.stat().st_ino
