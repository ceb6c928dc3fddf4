"""Out-of-tree kernel builds with the packed root inside.

One build directory per (source, config), kept between builds so that make
only redoes what changed. The initramfs is copied to a fixed name inside the
build directory and CONFIG_INITRAMFS_SOURCE points there: a new root then
changes one file and no config symbol, so make rebuilds usr/ and relinks
vmlinux instead of recompiling the kernel.

Linux 6.1's usr/Makefile embeds a CONFIG_INITRAMFS_SOURCE ending in
`.cpio.<suffix>` as-is (no second compression), and compresses a plain
`.cpio` with the configured INITRAMFS_COMPRESSION. We hand over the packer's
output unchanged and turn on the matching RD_<X> decompressor (and the
matching INITRAMFS_COMPRESSION_<X>, so the .config says what is inside).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import filecmp
import hashlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from autogentoo.daemon.kconfig import LogFn, make_argv, read_config, run_logged, set_options
from autogentoo.errors import InvalidArgument, NoSpace, NotFound

# cpio suffix -> (RD_ decompressor, INITRAMFS_COMPRESSION_ choice)
COMPRESSIONS: dict[str, tuple[str, str]] = {
    ".cpio.gz": ("RD_GZIP", "INITRAMFS_COMPRESSION_GZIP"),
    ".cpio.zst": ("RD_ZSTD", "INITRAMFS_COMPRESSION_ZSTD"),
    ".cpio.xz": ("RD_XZ", "INITRAMFS_COMPRESSION_XZ"),
    ".cpio.lz4": ("RD_LZ4", "INITRAMFS_COMPRESSION_LZ4"),
    ".cpio.bz2": ("RD_BZIP2", "INITRAMFS_COMPRESSION_BZIP2"),
    ".cpio.lzma": ("RD_LZMA", "INITRAMFS_COMPRESSION_LZMA"),
    ".cpio.lzo": ("RD_LZO", "INITRAMFS_COMPRESSION_LZO"),
}
STAGED_NAME = "autogentoo-initramfs"


@contextlib.asynccontextmanager
async def build_lock(build_dir: Path) -> AsyncIterator[None]:
    """Hold the build directory exclusively (merge + build), across processes.

    Two makes in one build directory corrupt it; a daemon job, a test run and
    a benchmark on the same machine all take this lock first.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(build_dir / ".autogentoo.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


@dataclass(frozen=True)
class BuildResult:
    bzimage: Path
    config: Path
    version: str
    efi_stub: bool
    seconds: float


def config_key(source_id: str, base: str | Path, fragments: Sequence[Path]) -> str:
    """Name for the build directory of this source + config.

    A base file and the fragments count by content (not by path), so editing
    a fragment gives a new directory and renaming one does not.
    """
    h = hashlib.sha256()
    h.update(f"source\0{source_id}\0".encode())
    if isinstance(base, Path):
        h.update(b"base-file\0" + hashlib.sha256(base.read_bytes()).digest())
    else:
        h.update(f"base-target\0{base}\0".encode())
    for frag in fragments:
        h.update(b"fragment\0" + hashlib.sha256(frag.read_bytes()).digest())
    return h.hexdigest()[:20]


def _suffix(initramfs: Path) -> str:
    name = initramfs.name
    if name.endswith(".cpio"):
        return ".cpio"
    for suffix in COMPRESSIONS:
        if name.endswith(suffix):
            return suffix
    raise InvalidArgument(
        f"initramfs {initramfs} must be named *.cpio or *.cpio.{{gz,zst,xz,lz4,bz2,lzma,lzo}} "
        "(the kernel picks how to embed it from the name)"
    )


def stage_initramfs(initramfs: Path, build_dir: Path) -> Path:
    """Copy initramfs to its fixed name in build_dir, only when it changed.

    A fresh copy has a new mtime, which is what make keys on; an unchanged
    root keeps the old file, so make has nothing to do.
    """
    if not initramfs.is_file():
        raise NotFound(f"initramfs {initramfs} does not exist")
    staged = build_dir / f"{STAGED_NAME}{_suffix(initramfs)}"
    if staged.is_file() and filecmp.cmp(initramfs, staged, shallow=False):
        return staged
    tmp = staged.with_name(staged.name + ".tmp")
    try:
        shutil.copyfile(initramfs, tmp)
        os.replace(tmp, staged)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"no space to stage {initramfs} in {build_dir}: {e.strerror}") from None
        raise
    return staged


def initramfs_options(staged: Path | None) -> dict[str, str | None]:
    if staged is None:
        return {"INITRAMFS_SOURCE": '""'}
    opts: dict[str, str | None] = {"BLK_DEV_INITRD": "y", "INITRAMFS_SOURCE": f'"{staged}"'}
    suffix = _suffix(staged)
    if suffix in COMPRESSIONS:
        rd, choice = COMPRESSIONS[suffix]
        opts[rd] = "y"
        opts[choice] = "y"
    return opts


async def build(
    source: Path,
    build_dir: Path,
    config_ready: bool,
    initramfs: Path | None,
    *,
    jobs: int,
    log: LogFn,
    arch: str = "x86_64",
) -> BuildResult:
    """Build bzImage in build_dir (which holds the merged .config).

    config_ready says build_dir/.config is as kconfig.merge left it; when
    False (a .config dropped in by hand), olddefconfig runs first.
    """
    start = time.monotonic()
    config = build_dir / ".config"
    if not config.is_file():
        raise NotFound(f"{config} does not exist: merge a config into {build_dir} first")
    if jobs < 1:
        raise InvalidArgument(f"jobs must be >= 1, got {jobs}")
    log(f"building {source} in {build_dir} on the host with -j{jobs}\n".encode())
    if not config_ready:
        await run_logged(make_argv(source, build_dir, "olddefconfig", arch=arch), log=log)
    staged = stage_initramfs(initramfs, build_dir) if initramfs is not None else None
    wanted = initramfs_options(staged)
    current = read_config(config)
    # Rewriting .config with the same values would still make Kbuild re-run
    # syncconfig; leave it untouched when it already says the right thing.
    if any(current.get(k) != v for k, v in wanted.items() if v != '""') or (
        wanted.get("INITRAMFS_SOURCE") == '""'
        and current.get("INITRAMFS_SOURCE") not in (None, '""')
    ):
        await set_options(source, build_dir, wanted, arch=arch, log=log)
    else:
        log(b"config already has the initramfs settings\n")
    await run_logged(make_argv(source, build_dir, "bzImage", arch=arch, jobs=jobs), log=log)
    bzimage = (
        build_dir
        / "arch"
        / ("x86" if arch in ("x86_64", "x86", "i386") else arch)
        / "boot"
        / "bzImage"
    )
    if not bzimage.is_file():
        raise NotFound(f"make finished but {bzimage} is missing")
    release = build_dir / "include" / "config" / "kernel.release"
    version = release.read_text().strip() if release.is_file() else "unknown"
    final = read_config(config)
    seconds = time.monotonic() - start
    log(f"built {bzimage} ({version}) in {seconds:.1f}s\n".encode())
    return BuildResult(bzimage, config, version, final.get("EFI_STUB") == "y", seconds)
