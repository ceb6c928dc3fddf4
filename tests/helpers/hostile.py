"""Hostile stage3-shaped tarballs, one per refusal rule of the importer.

Each builder writes a tarball that looks like a small stage3 (a few ordinary
directories and files) plus one hostile part aimed at `canary`, a directory
beside the extraction target: tests put the target at `<base>/dest` and the
canary at `<base>/canary`, so `../canary` from the target is the canary.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from autogentoo.errors import AgError, InvalidArgument, UnsafeArchive

GiB = 1 << 30


def _member(name: str, kind: bytes = tarfile.REGTYPE, **attrs: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 1_700_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def _write(
    path: Path,
    members: list[tuple[tarfile.TarInfo, bytes]],
    mode: Literal["w:gz", "w:xz"] = "w:gz",
) -> Path:
    """Ordinary stage3-ish members first, then the given ones, then one more file."""
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        for name in ("./", "./etc/", "./usr/", "./usr/bin/", "./tmp/", "./dev/"):
            tf.addfile(_member(name, tarfile.DIRTYPE))
        for info, data in [
            (_member("./etc/os-release", size=10), b"ID=gentoo\n"),
            *members,
            (_member("./etc/hostname", size=7), b"stage3\n"),
        ]:
            if info.isreg():
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return path


def _file(name: str, data: bytes = b"pwned\n", **attrs: Any) -> tuple[tarfile.TarInfo, bytes]:
    return _member(name, size=len(data), **attrs), data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes]:
    return _member(name, kind, linkname=target), b""


def _dev(
    name: str, major: int, minor: int, kind: bytes = tarfile.CHRTYPE, mode: int = 0o666
) -> tuple[tarfile.TarInfo, bytes]:
    return _member(name, kind, devmajor=major, devminor=minor, mode=mode), b""


def absolute_name(p: Path, canary: Path) -> Path:
    return _write(p, [_file(f"{canary}/pwned")])


def dotdot(p: Path, canary: Path) -> Path:
    return _write(p, [_file("../canary/pwned")])


def dotdot_inside(p: Path, canary: Path) -> Path:
    return _write(p, [_file("./etc/../../canary/pwned")])


def symlink_then_file(p: Path, canary: Path) -> Path:
    return _write(p, [_link("./escape", str(canary)), _file("./escape/pwned")])


def symlink_then_dir(p: Path, canary: Path) -> Path:
    return _write(
        p, [_link("./escape", str(canary)), (_member("./escape/sub", tarfile.DIRTYPE), b"")]
    )


def symlink_then_hardlink(p: Path, canary: Path) -> Path:
    return _write(
        p, [_link("./escape", str(canary)), _link("./stolen", "escape/secret", tarfile.LNKTYPE)]
    )


def dir_replaced_by_symlink(p: Path, canary: Path) -> Path:
    # etc/ was made a directory above; now the archive redefines it as a link
    return _write(p, [_link("./etc", str(canary)), _file("./etc/pwned")])


def implicit_dir_replaced_by_symlink(p: Path, canary: Path) -> Path:
    # a/ is never a member, tar makes it for a/f; then a becomes a link and a
    # hardlink through it would link(2) a host file into the root
    return _write(
        p,
        [_file("./a/f"), _link("./a", str(canary)), _link("./stolen", "a/secret", tarfile.LNKTYPE)],
    )


def hardlink_absolute(p: Path, canary: Path) -> Path:
    return _write(p, [_link("./shadow", "/etc/shadow", tarfile.LNKTYPE)])


def hardlink_to_canary(p: Path, canary: Path) -> Path:
    return _write(p, [_link("./stolen", f"{canary}/secret", tarfile.LNKTYPE)])


def hardlink_dotdot(p: Path, canary: Path) -> Path:
    return _write(p, [_link("./stolen", "../canary/secret", tarfile.LNKTYPE)])


def hardlink_to_directory(p: Path, canary: Path) -> Path:
    return _write(p, [_link("./etclink", "etc", tarfile.LNKTYPE)])


def hardlink_forward(p: Path, canary: Path) -> Path:
    # names a member that only comes later: tar would link whatever is there then
    return _write(p, [_link("./early", "etc/hostname", tarfile.LNKTYPE)])


def symlink_relative_escape(p: Path, canary: Path) -> Path:
    return _write(p, [_link("./etc/up", "../../canary")])


def symlink_chain_escape(p: Path, canary: Path) -> Path:
    # each link alone stays inside; followed together they climb out
    return _write(
        p,
        [
            (_member("./a", tarfile.DIRTYPE), b""),
            _link("./a/l", ".."),
            _link("./b", "a/l/../canary"),
        ],
    )


def symlink_long_chain(p: Path, canary: Path) -> Path:
    links = [_link(f"./l{i}", f"l{i + 1}") for i in range(45)]
    return _write(p, [*links, _link("./l45", "etc")])


def symlink_loop(p: Path, canary: Path) -> Path:
    return _write(p, [_link("./x", "y"), _link("./y", "x")])


def block_device(p: Path, canary: Path) -> Path:
    return _write(p, [_dev("./dev/sda", 8, 0, tarfile.BLKTYPE, 0o660)])


def char_device_odd(p: Path, canary: Path) -> Path:
    # /dev/mem's numbers under an innocent name
    return _write(p, [_dev("./dev/null", 1, 1)])


def char_device_elsewhere(p: Path, canary: Path) -> Path:
    return _write(p, [_dev("./tmp/null", 1, 3)])


def setuid_device(p: Path, canary: Path) -> Path:
    return _write(p, [_dev("./dev/null", 1, 3, mode=0o4666)])


def setuid_directory(p: Path, canary: Path) -> Path:
    return _write(p, [(_member("./usr/odd", tarfile.DIRTYPE, mode=0o4755), b"")])


def setuid_world_writable(p: Path, canary: Path) -> Path:
    return _write(p, [_file("./usr/bin/evil", b"#!/bin/sh\n", mode=0o4777)])


def setuid_in_tmp(p: Path, canary: Path) -> Path:
    return _write(p, [_file("./tmp/rootshell", b"\x7fELF", mode=0o4755)])


def setgid_in_home(p: Path, canary: Path) -> Path:
    return _write(
        p, [(_member("./home", tarfile.DIRTYPE), b""), _file("./home/x", b"\x7fELF", mode=0o2755)]
    )


def trusted_xattr(p: Path, canary: Path) -> Path:
    info, data = _file("./etc/fstab", b"")
    info.pax_headers = {"SCHILY.xattr.trusted.overlay.redirect": "/etc"}
    return _write(p, [(info, data)])


def fifo_setuid(p: Path, canary: Path) -> Path:
    return _write(p, [(_member("./tmp/fifo", tarfile.FIFOTYPE, mode=0o4644), b"")])


def unknown_type(p: Path, canary: Path) -> Path:
    return _write(p, [(_member("./etc/vol", b"V"), b"")])


def duplicate_file(p: Path, canary: Path) -> Path:
    return _write(p, [_file("./etc/passwd", b"a\n"), _file("./etc/passwd", b"b\n")])


def many_members(p: Path, canary: Path) -> Path:
    return _write(p, [_file(f"./usr/bin/f{i}", b"") for i in range(300)])


def many_bytes(p: Path, canary: Path) -> Path:
    """Twenty 1 MiB files: over the 8 MiB limit the test sets, caught on the 9th."""
    return _write(p, [_file(f"./usr/bin/f{i}", bytes(1 << 20)) for i in range(20)], "w:xz")


def huge_pax_header(p: Path, canary: Path) -> Path:
    info, data = _file("./etc/big")
    info.pax_headers = {"comment": "x" * (20 << 20)}
    return _write(p, [(info, data)], "w:xz")


def zstd_bomb(p: Path, canary: Path) -> Path:
    """A 10 GiB file of zeros in a few hundred KiB: concatenated zstd frames.

    zstd (like gzip and xz) decompresses concatenated frames as one stream, so
    one compressed 64 MiB run of zeros repeated 160 times is 10 GiB of tar data.
    """
    size = 10 * GiB
    head = _member("./usr/lib/zero", size=size).tobuf(
        tarfile.PAX_FORMAT, "utf-8", "surrogateescape"
    )
    run = 64 << 20
    zeros = _zstd(bytes(run))
    with open(p, "wb") as out:
        out.write(_zstd(head))
        for _ in range(size // run):
            out.write(zeros)
        out.write(_zstd(bytes(1024)))  # end-of-archive blocks
    return p


def _zstd(data: bytes) -> bytes:
    return subprocess.run(
        ["zstd", "-19", "-c", "-q"], input=data, check=True, capture_output=True
    ).stdout


def not_a_tarball(p: Path, canary: Path) -> Path:
    p.write_bytes(b"this is a text file, not a stage3\n" * 100)
    return p


def compressed_not_tar(p: Path, canary: Path) -> Path:
    p.write_bytes(
        subprocess.run(["xz", "-c"], input=os.urandom(4096), check=True, capture_output=True).stdout
    )
    return p


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path, Path], Path]
    error: type[AgError]
    rule: str
    limits: dict[str, int] = field(default_factory=dict)


CASES: tuple[Case, ...] = (
    Case("absolute_name", absolute_name, UnsafeArchive, "absolute"),
    Case("dotdot", dotdot, UnsafeArchive, "dotdot"),
    Case("dotdot_inside", dotdot_inside, UnsafeArchive, "dotdot"),
    Case("symlink_then_file", symlink_then_file, UnsafeArchive, "through_symlink"),
    Case("symlink_then_dir", symlink_then_dir, UnsafeArchive, "through_symlink"),
    Case("symlink_then_hardlink", symlink_then_hardlink, UnsafeArchive, "hardlink"),
    Case("dir_replaced_by_symlink", dir_replaced_by_symlink, UnsafeArchive, "duplicate"),
    Case(
        "implicit_dir_replaced_by_symlink",
        implicit_dir_replaced_by_symlink,
        UnsafeArchive,
        "duplicate",
    ),
    Case("hardlink_absolute", hardlink_absolute, UnsafeArchive, "absolute"),
    Case("hardlink_to_canary", hardlink_to_canary, UnsafeArchive, "absolute"),
    Case("hardlink_dotdot", hardlink_dotdot, UnsafeArchive, "dotdot"),
    Case("hardlink_to_directory", hardlink_to_directory, UnsafeArchive, "hardlink"),
    Case("hardlink_forward", hardlink_forward, UnsafeArchive, "hardlink"),
    Case("symlink_relative_escape", symlink_relative_escape, UnsafeArchive, "symlink_escape"),
    Case("symlink_chain_escape", symlink_chain_escape, UnsafeArchive, "symlink_escape"),
    Case("symlink_long_chain", symlink_long_chain, UnsafeArchive, "symlink_chain"),
    Case("symlink_loop", symlink_loop, UnsafeArchive, "symlink_chain"),
    Case("block_device", block_device, UnsafeArchive, "device"),
    Case("char_device_odd", char_device_odd, UnsafeArchive, "device"),
    Case("char_device_elsewhere", char_device_elsewhere, UnsafeArchive, "device"),
    Case("setuid_device", setuid_device, UnsafeArchive, "device"),
    Case("setuid_directory", setuid_directory, UnsafeArchive, "setid"),
    Case("setuid_world_writable", setuid_world_writable, UnsafeArchive, "setid"),
    Case("setuid_in_tmp", setuid_in_tmp, UnsafeArchive, "setid"),
    Case("setgid_in_home", setgid_in_home, UnsafeArchive, "setid"),
    Case("fifo_setuid", fifo_setuid, UnsafeArchive, "setid"),
    Case("trusted_xattr", trusted_xattr, UnsafeArchive, "xattr"),
    Case("unknown_type", unknown_type, UnsafeArchive, "type"),
    Case("duplicate_file", duplicate_file, UnsafeArchive, "duplicate"),
    Case("many_members", many_members, UnsafeArchive, "max_members", {"max_members": 100}),
    Case("many_bytes", many_bytes, UnsafeArchive, "max_bytes", {"max_bytes": 8 << 20}),
    Case("huge_pax_header", huge_pax_header, UnsafeArchive, "header"),
    Case("zstd_bomb", zstd_bomb, UnsafeArchive, "max_bytes", {"max_bytes": 64 << 20}),
    Case("not_a_tarball", not_a_tarball, InvalidArgument, ""),
    Case("compressed_not_tar", compressed_not_tar, InvalidArgument, "corrupt"),
)


def truncated(good: Path, p: Path) -> Path:
    data = good.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def corrupted(good: Path, p: Path) -> Path:
    data = bytearray(good.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(64)
    p.write_bytes(bytes(data))
    return p
