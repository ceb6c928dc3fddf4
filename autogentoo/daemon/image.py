"""Disk images for OpenStack (KVM and Xen guests), built without a mount.

Layout (GPT, 1 MiB aligned):

    sector 0      protective MBR carrying syslinux's gptmbr.bin (BIOS)
    partition 1   "boot": FAT32, EFI system partition type, LegacyBIOSBootable
                  /gentoo/vmlinuz, syslinux (/boot/extlinux) for BIOS,
                  systemd-boot as /EFI/BOOT/BOOTX64.EFI for UEFI
    partition 2   "root": ext4 filled from the root tree, type "Linux root
                  (x86-64)"; last, so cloud-init's growpart can grow it to a
                  flavor's larger disk
    last MiB      backup GPT

Why GPT and not MBR: one table serves BIOS (SeaBIOS under KVM and Xen HVM,
through gptmbr.bin and the LegacyBIOSBootable attribute) and UEFI (OVMF
finds the ESP by type), PARTUUIDs are real UUIDs we choose, and partitions
carry names and discoverable types. Xen PV's pygrub also reads GPT.

Why the bootloader sits on FAT: syslinux installs into a FAT filesystem
inside a file (`syslinux --offset`, through mtools) and mtools fills it, so
nothing is mounted; extlinux on ext4 needs the filesystem mounted. The one
kernel on FAT is used by both loaders. For UEFI the kernel is not itself
BOOTX64.EFI: an EFI-stub kernel started by the firmware gets no command
line, and root=PARTUUID differs per image, so systemd-boot (a Boot Loader
Specification entry) passes it. The syslinux config is
/boot/extlinux/extlinux.conf, a path syslinux, pygrub and U-Boot all look at.

Kernel command line: root=PARTUUID=..., which the kernel resolves itself
from the partition table; root=UUID= names a filesystem UUID, which only
userspace (blkid in an initramfs) can resolve, and this image has none.
`rootwait` because Xen's blkfront disks appear asynchronously. `ro`: the
root's init checks and remounts it read-write, as on any Gentoo install.
Consoles: the last console= is /dev/console (where init writes). ttyS0 goes
last, so KVM and Xen HVM guests log userspace to the serial port OpenStack
records; a Xen PV guest has no ttyS0 and falls back to hvc0.

/etc/fstab names filesystems by UUID: the disk is vda under KVM virtio, xvda
under Xen, sda under SCSI.

qcow2 is converted from the raw image with qemu-img, uncompressed by
default: compressed clusters are decompressed on every read when a cloud
uses the image as a backing file, and the raw image is already sparse.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import struct
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from autogentoo.daemon import imagefs
from autogentoo.daemon.imagefs import MIB, logged
from autogentoo.daemon.run import run
from autogentoo.errors import (
    CommandFailed,
    InvalidArgument,
    NoSpace,
    NotFound,
)

LogFn = Callable[[bytes], None]

GIB = 1 << 30
SECTOR = 512
ALIGN = MIB
DEFAULT_BOOT_SIZE = 64 * MIB
MIN_BOOT_SIZE = 33 * MIB  # FAT32 needs 65525 clusters
MIN_ROOT_SIZE = 16 * MIB
MAX_CMDLINE = 2047  # x86 COMMAND_LINE_SIZE minus the NUL

# GPT partition types.
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # discoverable partitions

GPTMBR = Path("/usr/lib/syslinux/mbr/gptmbr.bin")
SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")

KERNEL_PATH = "/gentoo/vmlinuz"  # on the boot partition
SYSLINUX_DIR = "/boot/extlinux"
ROOT_LABEL = "gentoo-root"
BOOT_LABEL = "GENTOO-BOOT"
CONSOLES = "console=tty0 console=hvc0 console=ttyS0,115200"

# mtools refuses FAT geometries that do not match a floppy or disk it knows.
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}


class DiskFormat(StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


class BootMode(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"
    BOTH = "both"

    @property
    def bios(self) -> bool:
        return self in (BootMode.BIOS, BootMode.BOTH)

    @property
    def uefi(self) -> bool:
        return self in (BootMode.UEFI, BootMode.BOTH)


class FsType(StrEnum):
    EXT4 = "ext4"


E = TypeVar("E", bound=StrEnum)


def parse_enum(kind: type[E], value: str | E) -> E:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise InvalidArgument(
            f"'{value}' is not a valid {kind.__name__} (one of: {allowed})"
        ) from None


@dataclass(frozen=True)
class Layout:
    """Where everything goes, in bytes from the start of the image."""

    size: int
    boot_start: int
    boot_size: int
    root_start: int
    root_size: int
    disk_uuid: str
    boot_partuuid: str
    root_partuuid: str
    root_fs_uuid: str
    boot_serial: str  # FAT volume id, 8 hex digits

    @property
    def boot_fs_uuid(self) -> str:
        """The FAT volume id the way blkid and fstab spell it (XXXX-XXXX)."""
        return f"{self.boot_serial[:4]}-{self.boot_serial[4:]}".upper()

    def sfdisk_script(self, *, legacy_boot: bool) -> str:
        attrs = ', attrs="LegacyBIOSBootable"' if legacy_boot else ""
        return (
            "label: gpt\n"
            f"label-id: {self.disk_uuid}\n"
            "unit: sectors\n"
            f"first-lba: {ALIGN // SECTOR}\n"
            f"start={self.boot_start // SECTOR}, size={self.boot_size // SECTOR}, "
            f'type={ESP_TYPE}, uuid={self.boot_partuuid}, name="boot"{attrs}\n'
            f"start={self.root_start // SECTOR}, size={self.root_size // SECTOR}, "
            f'type={ROOT_X86_64_TYPE}, uuid={self.root_partuuid}, name="root"\n'
        )


def plan_layout(size: int, boot_size: int) -> Layout:
    if size <= 0 or size % MIB:
        raise InvalidArgument(f"image size {size} must be a positive whole number of MiB")
    if boot_size < MIN_BOOT_SIZE or boot_size % MIB:
        raise InvalidArgument(
            f"boot partition size {boot_size} must be a whole number of MiB, "
            f"at least {MIN_BOOT_SIZE // MIB} MiB (FAT32)"
        )
    root_start = ALIGN + boot_size
    root_size = size - root_start - ALIGN  # the last MiB holds the backup GPT
    if root_size < MIN_ROOT_SIZE:
        least = (root_start + ALIGN + MIN_ROOT_SIZE) // MIB
        raise InvalidArgument(
            f"image size {size // MIB} MiB is too small: the boot partition takes "
            f"{boot_size // MIB} MiB; ask for at least {least} MiB"
        )
    return Layout(
        size=size,
        boot_start=ALIGN,
        boot_size=boot_size,
        root_start=root_start,
        root_size=root_size,
        disk_uuid=str(uuidlib.uuid4()),
        boot_partuuid=str(uuidlib.uuid4()),
        root_partuuid=str(uuidlib.uuid4()),
        root_fs_uuid=str(uuidlib.uuid4()),
        boot_serial=secrets.token_hex(4).upper(),
    )


def kernel_cmdline(layout: Layout, extra: str = "") -> str:
    base = f"root=PARTUUID={layout.root_partuuid} rootfstype=ext4 rootwait ro {CONSOLES}"
    line = f"{base} {extra.strip()}".strip()
    if any(ord(c) < 0x20 or c == "\x7f" for c in extra):
        raise InvalidArgument("cmdline_extra must be one line without control characters")
    if len(line) > MAX_CMDLINE:
        raise InvalidArgument(
            f"kernel command line is {len(line)} bytes; x86 allows at most {MAX_CMDLINE}"
        )
    return line


def fstab(layout: Layout) -> str:
    return (
        "# Written by autogentoo image. Filesystems by UUID: the disk is vda\n"
        "# under KVM (virtio), xvda under Xen, sda under SCSI.\n"
        f"UUID={layout.root_fs_uuid}\t/\text4\tdefaults,noatime\t0 1\n"
        f"UUID={layout.boot_fs_uuid}\t/boot\tvfat\tdefaults,nofail,umask=0077\t0 2\n"
    )


def extlinux_conf(cmdline: str) -> str:
    # SERIAL must come first; syslinux then also talks on the serial console.
    return (
        "SERIAL 0 115200\n"
        "DEFAULT gentoo\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "LABEL gentoo\n"
        "  MENU LABEL Gentoo Linux\n"
        f"  LINUX {KERNEL_PATH}\n"
        f"  APPEND {cmdline}\n"
    )


def loader_conf() -> str:
    return "default gentoo.conf\ntimeout 0\n"


def loader_entry(cmdline: str) -> str:
    return f"title Gentoo Linux\nlinux {KERNEL_PATH}\noptions {cmdline}\n"


def check_kernel(kernel: Path, *, uefi: bool) -> None:
    """A bzImage ("HdrS" boot protocol header); for UEFI also a PE image (EFI stub)."""
    try:
        with kernel.open("rb") as f:
            head = f.read(0x400)
    except FileNotFoundError:
        raise NotFound(f"kernel {kernel} does not exist") from None
    except IsADirectoryError:
        raise InvalidArgument(f"kernel {kernel} is a directory, not a bzImage") from None
    if head[0x202:0x206] != b"HdrS":
        raise InvalidArgument(
            f"{kernel} is not an x86 bzImage (no 'HdrS' boot header; a vmlinux ELF?)"
        )
    if uefi:
        pe = struct.unpack_from("<I", head, 0x3C)[0] if len(head) >= 0x40 else 0
        if head[:2] != b"MZ" or head[pe : pe + 4] != b"PE\0\0":
            raise InvalidArgument(
                f"{kernel} has no EFI stub (CONFIG_EFI_STUB): it cannot boot with UEFI; "
                "use boot=bios or rebuild the kernel with the EFI stub"
            )


# --- the result --------------------------------------------------------------


@dataclass(frozen=True)
class ImageResult:
    path: Path
    properties_path: Path
    fmt: DiskFormat
    boot: BootMode
    fs: FsType
    size: int  # virtual disk size in bytes
    cmdline: str
    disk_uuid: str
    root_partuuid: str
    root_fs_uuid: str
    boot_fs_uuid: str
    root_bytes: int  # the root's files as the estimate counted them
    apparent_bytes: int  # the image file's length
    allocated_bytes: int  # what the image file occupies on disk
    sha256: str
    md5: str
    min_ram_mib: int
    seconds: float


def image_properties(result: ImageResult) -> dict[str, Any]:
    """What to give the image service (glance) for this image.

    checksum/os_hash_* are what glance will compute on upload (to compare);
    glance's own os_hash_algo defaults to sha512, set hashing_algorithm =
    sha256 there for a direct match.
    """
    firmware = "uefi" if result.boot is BootMode.UEFI else "bios"
    return {
        "disk_format": str(result.fmt),
        "container_format": "bare",
        "min_disk": max(1, math.ceil(result.size / GIB)),
        "min_ram": result.min_ram_mib,
        "checksum": result.md5,
        "os_hash_algo": "sha256",
        "os_hash_value": result.sha256,
        "properties": {
            "architecture": "x86_64",
            "os_distro": "gentoo",
            "os_type": "linux",
            "hw_disk_bus": "virtio",
            "hw_vif_model": "virtio",
            "hw_firmware_type": firmware,
            # Booted through the firmware and a bootloader on both
            # hypervisors: a Xen host runs it as HVM (PVHVM drivers inside).
            "vm_mode": "hvm",
        },
    }


# --- building ----------------------------------------------------------------


@contextlib.contextmanager
def _step(log: LogFn, name: str) -> Iterator[None]:
    start = time.monotonic()
    log(f"== {name}\n".encode())
    yield
    log(f"== {name}: {time.monotonic() - start:.2f}s\n".encode())


def _create_sparse(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def _hash_file(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with path.open("rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


async def _digests(path: Path) -> tuple[str, str]:
    # One thread per algorithm: hashlib drops the GIL on large buffers.
    sha256, md5 = await asyncio.gather(
        asyncio.to_thread(_hash_file, path, "sha256"),
        asyncio.to_thread(_hash_file, path, "md5"),
    )
    return sha256, md5


def _sectors_per_cluster(boot_size: int) -> int:
    """The largest cluster (up to 4 KiB) that keeps FAT32 above 65525 clusters."""
    spc = 8
    # 2% of the partition is more than two FATs and the reserved sectors take.
    while spc > 1 and boot_size * 0.98 / (spc * SECTOR) < 65600:
        spc //= 2
    return spc


async def _fill_boot(
    disk: Path, layout: Layout, kernel: Path, cmdline: str, boot: BootMode, work: Path, log: LogFn
) -> None:
    await logged(
        [
            "mkfs.fat",
            "-F",
            "32",
            "-S",
            str(SECTOR),
            "--offset",
            str(layout.boot_start // SECTOR),
            # Hidden sectors = the partition's first LBA: the syslinux boot
            # sector needs it to find ldlinux.sys on the disk.
            "-h",
            str(layout.boot_start // SECTOR),
            # Cluster size from the partition, not the disk: mkfs.fat sizes
            # clusters by the whole file and can leave FAT32 under its
            # 65525-cluster minimum, which mtools then cannot use.
            "-s",
            str(_sectors_per_cluster(layout.boot_size)),
            "-i",
            layout.boot_serial,
            "-n",
            BOOT_LABEL,
            str(disk),
            str(layout.boot_size // 1024),
        ],
        log=log,
    )
    fat = f"{disk}@@{layout.boot_start}"
    dirs = ["::/gentoo"]
    files: list[tuple[Path, str]] = [(kernel, f"::{KERNEL_PATH}")]
    if boot.bios:
        conf = work / "extlinux.conf"
        conf.write_text(extlinux_conf(cmdline))
        dirs += ["::/boot", f"::{SYSLINUX_DIR}"]
        files.append((conf, f"::{SYSLINUX_DIR}/extlinux.conf"))
    if boot.uefi:
        if not SYSTEMD_BOOT.is_file():
            raise NotFound(f"{SYSTEMD_BOOT} is missing: apt-get install systemd-boot-efi")
        lconf, entry = work / "loader.conf", work / "gentoo.conf"
        lconf.write_text(loader_conf())
        entry.write_text(loader_entry(cmdline))
        dirs += ["::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"]
        files += [
            (SYSTEMD_BOOT, "::/EFI/BOOT/BOOTX64.EFI"),
            (lconf, "::/loader/loader.conf"),
            (entry, "::/loader/entries/gentoo.conf"),
        ]
    await logged(["mmd", "-i", fat, *dirs], log=log, env=MTOOLS_ENV)
    for src, dst in files:
        await logged(["mcopy", "-i", fat, str(src), dst], log=log, env=MTOOLS_ENV)
    if boot.bios:
        if not GPTMBR.is_file():
            raise NotFound(f"{GPTMBR} is missing: apt-get install syslinux-common")
        await logged(
            [
                "syslinux",
                "--install",
                "--offset",
                str(layout.boot_start),
                "--directory",
                SYSLINUX_DIR,
                str(disk),
            ],
            log=log,
            env=MTOOLS_ENV,
        )
        # syslinux says "warning" and exits 0 when it cannot place its files.
        listing = await _mdir(fat, SYSLINUX_DIR)
        if "ldlinux  sys" not in listing or "ldlinux  c32" not in listing:
            raise CommandFailed(
                f"syslinux did not install ldlinux.sys/ldlinux.c32 in {SYSLINUX_DIR}",
                command="syslinux",
            )
        _write_mbr_code(disk, GPTMBR.read_bytes())


async def _mdir(fat: str, directory: str) -> str:
    return (await run(["mdir", "-i", fat, "-a", f"::{directory}"], env=MTOOLS_ENV)).text


def _write_mbr_code(disk: Path, code: bytes) -> None:
    """Boot code into the first 440 bytes; the disk signature and the
    protective partition entry after them stay as sfdisk wrote them."""
    if len(code) > 440:
        raise InvalidArgument(f"MBR boot code is {len(code)} bytes; at most 440 fit")
    fd = os.open(disk, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, code, 0)
    finally:
        os.close(fd)


async def build_image(
    root: Path,
    kernel: Path,
    dest: Path,
    *,
    size: int,
    fmt: DiskFormat | str = DiskFormat.RAW,
    boot: BootMode | str = BootMode.BIOS,
    fs: FsType | str = FsType.EXT4,
    cmdline_extra: str = "",
    boot_size: int = DEFAULT_BOOT_SIZE,
    compress: bool = False,
    min_ram_mib: int = 512,
    log: LogFn,
) -> ImageResult:
    """Build a bootable disk image of root at dest, plus dest + ".json".

    The root is only read. Everything is written to temporary files beside
    dest and renamed on success; on any failure (TooLarge, NoSpace,
    NotFound, a tool failing, cancellation) nothing is left behind.
    """
    start = time.monotonic()
    fmt, boot, fs = (
        parse_enum(DiskFormat, fmt),
        parse_enum(BootMode, boot),
        parse_enum(FsType, fs),
    )
    if not root.is_dir():
        raise NotFound(f"root {root} does not exist or is not a directory")
    check_kernel(kernel, uefi=boot.uefi)
    if not dest.parent.is_dir():
        raise NotFound(f"destination directory {dest.parent} does not exist")
    if min_ram_mib < 0:
        raise InvalidArgument(f"min_ram_mib must not be negative, got {min_ram_mib}")
    layout = plan_layout(size, boot_size)
    cmdline = kernel_cmdline(layout, cmdline_extra)

    with _step(log, f"scan {root}"):
        scan = await imagefs.scan_root_async(root)
    fsplan = imagefs.plan(scan, layout.root_size, image_size=size, root=root)
    # A lower bound, to refuse early only what certainly cannot work: the
    # sparse image holds at least the root's data. A disk that fills up
    # later (kernel, metadata, the qcow2 copy) is caught as it happens.
    need = scan.data_bytes
    free = _free_bytes(dest.parent)
    if free < need:
        raise NoSpace(
            f"{dest.parent} has {free / MIB:.1f} MiB free; building this image needs "
            f"at least {need / MIB:.1f} MiB (the root's data)",
            free_bytes=free,
            needed_bytes=need,
        )

    token = secrets.token_hex(4)
    tmp_raw = dest.with_name(f".{dest.name}.{token}.raw.partial")
    tmp_out = dest.with_name(f".{dest.name}.{token}.partial")
    props_path = dest.with_name(dest.name + ".json")
    tmp_props = dest.with_name(f".{props_path.name}.{token}.partial")
    temps = (tmp_raw, tmp_out, tmp_props)
    try:
        with tempfile.TemporaryDirectory(prefix="autogentoo-image.") as workdir:
            work = Path(workdir)
            # Tools get a plain alias: libext2fs reads '?' and mtools '@@'
            # in a file name as options, and dest may contain either.
            disk = work / "disk.img"
            _create_sparse(tmp_raw, size)
            disk.symlink_to(tmp_raw.resolve())
            with _step(log, "partition table"):
                await logged(
                    ["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(disk)],
                    input=layout.sfdisk_script(legacy_boot=boot.bios).encode(),
                    log=log,
                )
            with _step(log, "boot partition"):
                await _fill_boot(disk, layout, kernel, cmdline, boot, work, log)
            with _step(log, f"ext4 from {root}"):
                await imagefs.make_ext4(
                    disk,
                    root,
                    fsplan,
                    offset=layout.root_start,
                    uuid=layout.root_fs_uuid,
                    label=ROOT_LABEL,
                    log=log,
                )
                tab = work / "fstab"
                tab.write_text(fstab(layout))
                await imagefs.replace_file(
                    disk,
                    offset=layout.root_start,
                    path="/etc/fstab",
                    source=tab,
                    mode=0o644,
                    log=log,
                )
                await imagefs.check_ext4(disk, offset=layout.root_start, log=log)
            if fmt is DiskFormat.QCOW2:
                with _step(log, "qcow2"):
                    argv = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"]
                    if compress:
                        argv.append("-c")
                    await logged([*argv, str(disk), str(tmp_out)], log=log)
                tmp_raw.unlink()
            else:
                os.rename(tmp_raw, tmp_out)
        with _step(log, "checksums"):
            sha256, md5 = await _digests(tmp_out)
            await asyncio.to_thread(_fsync, tmp_out)
        result = ImageResult(
            path=dest,
            properties_path=props_path,
            fmt=fmt,
            boot=boot,
            fs=fs,
            size=size,
            cmdline=cmdline,
            disk_uuid=layout.disk_uuid,
            root_partuuid=layout.root_partuuid,
            root_fs_uuid=layout.root_fs_uuid,
            boot_fs_uuid=layout.boot_fs_uuid,
            root_bytes=scan.data_bytes,
            apparent_bytes=tmp_out.stat().st_size,
            allocated_bytes=_allocated(tmp_out),
            sha256=sha256,
            md5=md5,
            min_ram_mib=min_ram_mib,
            seconds=0.0,
        )
        tmp_props.write_text(json.dumps(image_properties(result), indent=2, sort_keys=True) + "\n")
        os.rename(tmp_out, dest)
        try:
            os.rename(tmp_props, props_path)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
    except BaseException as e:
        for t in temps:
            t.unlink(missing_ok=True)
        if isinstance(e, CommandFailed) and _free_bytes(dest.parent) < MIB:
            # Tools word a full disk in many ways ("Disk full", short writes).
            raise NoSpace(f"{dest.parent} ran out of space: {e.message}") from None
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"{dest.parent} ran out of space: {e}") from None
        raise
    seconds = time.monotonic() - start
    log(
        f"image {dest}: {fmt} {size // MIB} MiB virtual, "
        f"{result.allocated_bytes / MIB:.1f} MiB on disk, {seconds:.1f}s\n".encode()
    )
    return replace(result, seconds=seconds)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tool_paths() -> dict[str, str | None]:
    """The host tools build_image runs, for a readiness check."""
    tools = ("sfdisk", "mkfs.fat", "mmd", "mcopy", "mdir", "syslinux", "mke2fs", "debugfs")
    return {t: shutil.which(t) for t in (*tools, "e2fsck", "qemu-img")}
