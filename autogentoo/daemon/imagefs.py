"""The root filesystem of a disk image: sized, built and amended without a mount.

`mke2fs -d ROOT -E offset=...` writes the ext4 filesystem straight into its
partition of the image file, copying the tree (owners, modes, xattrs and so
file capabilities, hard links, device nodes, holes) from the directory. The
root is only read. Per-image files (/etc/fstab) are then replaced inside the
new filesystem with debugfs, which edits it in place through libext2fs: the
root tree never gets them, and no loop device or mount is involved.

Why not build the filesystem in a separate file and copy it in: that writes
every data byte twice and needs the space twice; with the offset the data is
written once, into a hole of the sparse image (bench/image.py measures both).

The image file is fresh (ftruncate: all holes, reads as zeros), so mke2fs is
told `assume_storage_prezeroed`: it skips writing zeroed inode tables and
journal blocks yet marks them initialised (ITABLE_ZEROED), so neither
mke2fs nor the guest's first boot (ext4lazyinit) writes them; a small root
gives a small sparse image.
"""

from __future__ import annotations

import asyncio
import math
import os
import shlex
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from autogentoo.daemon.run import run
from autogentoo.errors import CommandFailed, TooLarge

LogFn = Callable[[bytes], None]

BLOCK = 4096
MIB = 1 << 20
INODE_SIZE = 256
INODE_RATIO = 16384  # mke2fs.conf's default bytes-per-inode
# Filesystem features beyond the host's mke2fs.conf defaults that older
# e2fsprogs cannot handle (e.g. a compute host's resize2fs growing the disk):
# e2fsprogs 1.47 can default to them, so they are turned off explicitly.
# 64bit stays on: the bootloader lives on the FAT partition, so nothing that
# predates 64bit ext4 (syslinux < 6.03, the seed's extlinux) ever reads it.
FEATURES = "^metadata_csum_seed,^orphan_file"
# Space the estimate keeps free beyond what it can count (directory growth,
# extent tree blocks, xattr blocks): mke2fs failing later is still caught.
SLACK_FRACTION = 0.02
SLACK_MIN = 4 * MIB


@dataclass(frozen=True)
class RootScan:
    """What the root needs on ext4: 4 KiB blocks of data and inodes."""

    data_bytes: int  # file data rounded to blocks, holes not counted
    apparent_bytes: int  # sum of file sizes (what `du --apparent-size` says)
    inodes: int


@dataclass(frozen=True)
class FsPlan:
    size: int  # bytes in the partition
    inodes: int | None  # -N, when the default ratio would give too few
    needed: int  # estimated bytes the filled filesystem uses


def _blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


def scan_root(root: Path) -> RootScan:
    """Walk the root without following symlinks; hard links count once."""
    seen: set[tuple[int, int]] = set()
    data = apparent = inodes = 0
    stack = [str(root)]
    while stack:
        top = stack.pop()
        with os.scandir(top) as it:
            entries = list(it)
        inodes += 1
        # A directory entry is 8 bytes + the name, 4-byte aligned.
        dir_bytes = 24 + sum(8 + ((len(e.name) + 3) & ~3) for e in entries)
        data += _blocks(dir_bytes) * BLOCK
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
                continue
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            inodes += 1
            if stat.S_ISREG(st.st_mode):
                apparent += st.st_size
                allocated = min(st.st_size, st.st_blocks * 512)
                data += _blocks(allocated) * BLOCK
            elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:
                data += BLOCK  # shorter targets live inside the inode
    return RootScan(data, apparent, inodes)


def journal_bytes(fs_bytes: int) -> int:
    """ext2fs_default_journal_size() of e2fsprogs 1.46/1.47, in bytes."""
    blocks = fs_bytes // BLOCK
    for limit, jblocks in (
        (32768, 1024),
        (256 * 1024, 4096),
        (512 * 1024, 8192),
        (4096 * 1024, 16384),
        (8192 * 1024, 32768),
        (16384 * 1024, 65536),
        (32768 * 1024, 131072),
    ):
        if blocks < limit:
            return jblocks * BLOCK
    return 262144 * BLOCK


def plan(scan: RootScan, fs_bytes: int, *, image_size: int, root: Path) -> FsPlan:
    """Check the root fits a partition of fs_bytes; raise TooLarge if not."""
    default_inodes = fs_bytes // INODE_RATIO
    inodes: int | None = None
    inode_count = default_inodes
    if scan.inodes > default_inodes * 0.9:
        # Many small files: ask for more inodes than the ratio gives.
        inode_count = math.ceil(scan.inodes * 1.2) + 64
        inodes = inode_count
    groups = max(1, fs_bytes // (BLOCK * 32768))
    overhead = (
        inode_count * INODE_SIZE
        + journal_bytes(fs_bytes)
        + groups * 2 * BLOCK  # block and inode bitmaps
        + 1024 * BLOCK  # superblock backups, group descriptors, resize reserve
    )
    slack = max(SLACK_MIN, int(fs_bytes * SLACK_FRACTION))
    needed = scan.data_bytes + overhead + slack
    if needed > fs_bytes:
        # The smallest image: the same fixed parts plus a partition that
        # fits; overhead grows with the partition, so over-ask a little.
        fixed = image_size - fs_bytes
        suggest = math.ceil((fixed + needed * 1.1) / MIB)
        raise TooLarge(
            f"root {root} needs about {_mib(needed)} on ext4 "
            f"({_mib(scan.data_bytes)} of files in {scan.inodes} inodes, "
            f"{_mib(needed - scan.data_bytes)} filesystem overhead), but a "
            f"{_mib(image_size)} image leaves {_mib(fs_bytes)} for the root "
            f"partition: ask for a size of at least {suggest} MiB",
            root_bytes=scan.data_bytes,
            needed_bytes=needed,
            partition_bytes=fs_bytes,
            image_bytes=image_size,
            suggested_mib=suggest,
        )
    return FsPlan(fs_bytes, inodes, needed)


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def mke2fs_argv(
    image: Path,
    root: Path,
    fs: FsPlan,
    *,
    offset: int,
    uuid: str,
    label: str,
) -> list[str]:
    argv = [
        "mke2fs",
        "-q",
        "-F",
        "-t",
        "ext4",
        "-b",
        str(BLOCK),
        "-U",
        uuid,
        "-L",
        label,
        "-O",
        FEATURES,
        "-E",
        f"offset={offset},assume_storage_prezeroed=1,nodiscard",
        "-d",
        str(root),
    ]
    if fs.inodes is not None:
        argv += ["-N", str(fs.inodes)]
    # The size argument is in blocks of -b; without it mke2fs would take the
    # rest of the file, the GPT backup header included.
    return [*argv, str(image), str(fs.size // BLOCK)]


def device(image: Path, offset: int) -> str:
    """libext2fs' spelling of "this file, starting at offset" (unix_io options)."""
    return f"{image}?offset={offset}"


async def make_ext4(
    image: Path,
    root: Path,
    fs: FsPlan,
    *,
    offset: int,
    uuid: str,
    label: str,
    log: LogFn,
) -> None:
    argv = mke2fs_argv(image, root, fs, offset=offset, uuid=uuid, label=label)
    try:
        await logged(argv, log=log)
    except CommandFailed as e:
        # The estimate said it fits but it did not: still the user's sizing.
        if "Could not allocate" in e.message or "No free space" in e.message:
            raise TooLarge(
                f"root {root} does not fit the {_mib(fs.size)} root partition "
                f"(estimated {_mib(fs.needed)}): {e.message}",
                partition_bytes=fs.size,
                needed_bytes=fs.needed,
            ) from None
        raise


async def replace_file(
    image: Path,
    *,
    offset: int,
    path: str,
    source: Path,
    mode: int,
    log: LogFn,
) -> None:
    """Put source at path (absolute, in an existing directory) in the image's ext4.

    debugfs exits 0 even when a command fails, so the file is read back and
    compared: a root whose /etc/fstab is a directory, say, fails here.
    """
    parent, _, name = path.rpartition("/")
    if not path.startswith("/") or not name or any(c in path for c in ' "\n'):
        raise ValueError(f"unsupported in-image path {path!r}")
    dev = device(image, offset)
    exists = await run(["debugfs", "-R", f"stat {path}", dev], check=False)
    script = []
    if parent:
        has_parent = await run(["debugfs", "-R", f"stat {parent}", dev], check=False)
        if b"Inode:" not in has_parent.stdout:
            script.append(f"mkdir {parent}")  # a root without /etc, say
    script.append(f"cd {parent or '/'}")
    if exists.returncode == 0 and b"Inode:" in exists.stdout:
        script.append(f"rm {name}")
    script += [
        f"write {source} {name}",
        f"sif {name} mode 0{0o100000 | mode:o}",
        f"sif {name} uid 0",
        f"sif {name} gid 0",
    ]
    log(f"+ debugfs -w {dev}: {'; '.join(script)}\n".encode())
    await run(["debugfs", "-w", "-f", "-", dev], input="\n".join(script).encode() + b"\n")
    back = await run(["debugfs", "-R", f"cat {path}", dev])
    if back.stdout != source.read_bytes():
        raise CommandFailed(
            f"debugfs could not replace {path} in the image "
            f"(is it a directory or a dangling symlink in the root?)",
            command="debugfs",
        )


async def check_ext4(image: Path, *, offset: int, log: LogFn) -> None:
    """e2fsck -fn: a filesystem we just made must be clean."""
    await logged(["e2fsck", "-f", "-n", device(image, offset)], log=log)


async def logged(
    argv: list[str],
    *,
    log: LogFn,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """run() with the command line and its output in the job log."""
    log(f"+ {shlex.join(argv)}\n".encode())
    result = await run(argv, input=input, env=env)
    for stream in (result.stdout, result.stderr):
        if stream.strip():
            log(stream if stream.endswith(b"\n") else stream + b"\n")


async def scan_root_async(root: Path) -> RootScan:
    return await asyncio.to_thread(scan_root, root)
