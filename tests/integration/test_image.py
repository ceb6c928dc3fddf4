"""Disk images built from a busybox root: layout, per-image files, failures.

No kernel is built here: where booting is not tested, the "kernel" is a
small file with just the headers build_image checks (the bzImage "HdrS"
boot header and, for UEFI, a PE signature). Booting real kernels from real
images is tests/e2e/test_image_boot.py.

Everything is inspected the way an operator would, without mounting: sfdisk
--json for the table, debugfs for files in the ext4, mtools for the FAT,
qemu-img for qcow2.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autogentoo.daemon import image
from autogentoo.daemon.image import ESP_TYPE, GPTMBR, ROOT_X86_64_TYPE
from autogentoo.daemon.imagefs import MIB
from autogentoo.errors import InvalidArgument, NoSpace, NotFound, TooLarge
from tests.helpers.stage3 import build_tree

pytestmark = pytest.mark.integration

SIZE = 128 * MIB


def fake_kernel(path: Path, *, efi: bool = True, size: int = 64 * 1024) -> Path:
    """Not a kernel: only the header bytes build_image looks at."""
    data = bytearray(b"\x5a" * size)
    data[0x202:0x206] = b"HdrS"
    if efi:
        data[0:2] = b"MZ"
        data[0x3C:0x40] = (0x80).to_bytes(4, "little")
        data[0x80:0x84] = b"PE\0\0"
    else:
        data[0:2] = b"\xea\x05"
    path.write_bytes(bytes(data))
    return path


class Log:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.chunks.append(data)

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")


def tree_digest(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry's type, owner, mode, size, mtime, ctime and content."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""]:
            p = Path(dirpath, name) if name else Path(dirpath)
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                content: str = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            else:
                content = ""
            meta = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            out[str(p.relative_to(root))] = (*meta, content)
    return out


def sh(*argv: str, env: dict[str, str] | None = None) -> str:
    full = {**os.environ, "MTOOLS_SKIP_CHECK": "1", **(env or {})}
    return subprocess.run(argv, check=True, capture_output=True, text=True, env=full).stdout


def ext4_cat(img: Path, offset: int, path: str) -> str:
    return sh("debugfs", "-R", f"cat {path}", f"{img}?offset={offset}")


def fat_cat(img: Path, offset: int, path: str) -> str:
    return sh("mtype", "-i", f"{img}@@{offset}", f"::{path}")


def fat_bytes(img: Path, offset: int, path: str) -> bytes:
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    argv = ["mcopy", "-n", "-i", f"{img}@@{offset}", f"::{path}", "-"]
    return subprocess.run(argv, check=True, capture_output=True, env=env).stdout


def partitions(img: Path) -> dict[str, Any]:
    table: dict[str, Any] = json.loads(sh("sfdisk", "--json", str(img)))["partitiontable"]
    return table


@pytest.fixture
def root(tmp_path: Path) -> Path:
    tree = build_tree(tmp_path / "root")
    # A stage3 ships an fstab of its own: the image must replace it, the
    # root must keep it.
    (tree / "etc/fstab").write_text("# /dev/BOOT  /boot  ext2  noauto,noatime  1 2\n")
    return tree


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    return fake_kernel(tmp_path / "bzImage")


async def test_bios_raw_image(root: Path, kernel: Path, out: Path) -> None:
    before = tree_digest(root)
    log = Log()
    res = await image.build_image(root, kernel, out / "g.img", size=SIZE, boot="bios", log=log)
    assert tree_digest(root) == before, "the root was modified"
    img = out / "g.img"
    assert sorted(p.name for p in out.iterdir()) == ["g.img", "g.img.json"]
    assert img.stat().st_size == SIZE
    assert res.allocated_bytes < 16 * MIB  # sparse: about the root, not the size

    table = partitions(img)
    assert table["label"] == "gpt"
    assert table["id"].lower() == res.disk_uuid
    boot, rootp = table["partitions"]
    assert boot["type"] == ESP_TYPE
    assert "LegacyBIOSBootable" in boot.get("attrs", "")
    assert boot["start"] == 2048  # 1 MiB aligned
    assert rootp["type"] == ROOT_X86_64_TYPE
    assert rootp["uuid"].lower() == res.root_partuuid
    assert rootp["start"] % 2048 == 0
    assert (rootp["start"] + rootp["size"]) * 512 <= SIZE - MIB  # room for the backup GPT

    # BIOS boot code in the protective MBR, partition entries intact.
    mbr = img.read_bytes()[:512]
    assert mbr[:440] == GPTMBR.read_bytes()[:440]
    assert mbr[510:512] == b"\x55\xaa" and mbr[450] == 0xEE

    root_off = rootp["start"] * 512
    fstab = ext4_cat(img, root_off, "/etc/fstab")
    assert f"UUID={res.root_fs_uuid}\t/\text4" in fstab
    assert f"UUID={res.boot_fs_uuid}\t/boot\tvfat" in fstab
    assert "/dev/" not in fstab
    assert "/dev/BOOT" in (root / "etc/fstab").read_text()  # the root's own, untouched
    # The filesystem really has that UUID (what the fstab line names).
    probe = sh("blkid", "-p", "-O", str(root_off), "-o", "export", str(img))
    assert f"UUID={res.root_fs_uuid}" in probe and "TYPE=ext4" in probe
    assert "busybox" in sh("debugfs", "-R", "ls /bin", f"{img}?offset={root_off}")
    sh("e2fsck", "-fn", f"{img}?offset={root_off}")

    conf = fat_cat(img, boot["start"] * 512, "/boot/extlinux/extlinux.conf")
    assert f"root=PARTUUID={res.root_partuuid}" in conf
    assert "console=hvc0" in conf and "console=ttyS0,115200" in conf
    assert conf.index("console=hvc0") < conf.index("console=ttyS0")  # ttyS0 is /dev/console
    assert f"root=PARTUUID={res.root_partuuid}" in res.cmdline
    listing = sh("mdir", "-i", f"{img}@@{boot['start'] * 512}", "-a", "::/boot/extlinux")
    assert "ldlinux  sys" in listing and "ldlinux  c32" in listing
    assert fat_bytes(img, boot["start"] * 512, "/gentoo/vmlinuz") == kernel.read_bytes()

    props = json.loads((out / "g.img.json").read_text())
    assert props == image.image_properties(res)
    assert props["disk_format"] == "raw" and props["container_format"] == "bare"
    assert props["min_disk"] == 1
    assert props["checksum"] == hashlib.md5(img.read_bytes()).hexdigest()
    assert props["os_hash_algo"] == "sha256"
    assert props["os_hash_value"] == hashlib.sha256(img.read_bytes()).hexdigest()
    p = props["properties"]
    assert p["hw_disk_bus"] == "virtio" and p["hw_vif_model"] == "virtio"
    assert p["hw_firmware_type"] == "bios" and p["os_distro"] == "gentoo"
    assert p["vm_mode"] == "hvm"
    assert "ext4 from" in log.text()


async def test_both_has_systemd_boot_entry(root: Path, kernel: Path, out: Path) -> None:
    res = await image.build_image(root, kernel, out / "g.img", size=SIZE, boot="both", log=Log())
    img = out / "g.img"
    boot = partitions(img)["partitions"][0]
    off = boot["start"] * 512
    entry = fat_cat(img, off, "/loader/entries/gentoo.conf")
    assert "linux /gentoo/vmlinuz" in entry
    assert f"options {res.cmdline}" in entry
    assert "timeout 0" in fat_cat(img, off, "/loader/loader.conf")
    assert fat_bytes(img, off, "/EFI/BOOT/BOOTX64.EFI") == image.SYSTEMD_BOOT.read_bytes()
    # both: BIOS pieces too
    assert "LegacyBIOSBootable" in boot.get("attrs", "")
    assert "root=PARTUUID" in fat_cat(img, off, "/boot/extlinux/extlinux.conf")


async def test_uefi_only(root: Path, kernel: Path, out: Path) -> None:
    res = await image.build_image(root, kernel, out / "g.img", size=SIZE, boot="uefi", log=Log())
    img = out / "g.img"
    boot = partitions(img)["partitions"][0]
    assert "LegacyBIOSBootable" not in boot.get("attrs", "")
    assert img.read_bytes()[:440] == bytes(440)  # no BIOS boot code
    assert image.image_properties(res)["properties"]["hw_firmware_type"] == "uefi"


async def test_uefi_needs_efi_stub(root: Path, tmp_path: Path, out: Path) -> None:
    k = fake_kernel(tmp_path / "nostub", efi=False)
    with pytest.raises(InvalidArgument, match="EFI stub"):
        await image.build_image(root, k, out / "g.img", size=SIZE, boot="uefi", log=Log())
    assert list(out.iterdir()) == []


async def test_qcow2(root: Path, kernel: Path, out: Path, tmp_path: Path) -> None:
    res = await image.build_image(
        root, kernel, out / "g.qcow2", size=SIZE, fmt="qcow2", boot="both", log=Log()
    )
    img = out / "g.qcow2"
    info = json.loads(sh("qemu-img", "info", "--output=json", str(img)))
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == SIZE
    sh("qemu-img", "check", str(img))
    assert sorted(p.name for p in out.iterdir()) == ["g.qcow2", "g.qcow2.json"]
    props = json.loads((out / "g.qcow2.json").read_text())
    assert props["disk_format"] == "qcow2"
    assert props["os_hash_value"] == hashlib.sha256(img.read_bytes()).hexdigest()
    # The same disk inside: convert back and read the table and fstab.
    raw = tmp_path / "back.raw"
    sh("qemu-img", "convert", "-O", "raw", str(img), str(raw))
    rootp = partitions(raw)["partitions"][1]
    assert rootp["uuid"].lower() == res.root_partuuid
    assert f"UUID={res.root_fs_uuid}" in ext4_cat(raw, rootp["start"] * 512, "/etc/fstab")


async def test_root_too_large(root: Path, kernel: Path, out: Path) -> None:
    (root / "big").write_bytes(b"\xa5" * (40 * MIB))
    size = 82 * MIB  # 64 MiB boot + 16 MiB root + 2 MiB alignment and GPT
    with pytest.raises(TooLarge) as exc:
        await image.build_image(root, kernel, out / "g.img", size=size, log=Log())
    msg = exc.value.message
    assert "82.0 MiB image" in msg and "16.0 MiB for the root" in msg
    assert "at least" in msg
    assert list(out.iterdir()) == []
    suggested = exc.value.details["suggested_mib"] * MIB
    await image.build_image(root, kernel, out / "g.img", size=suggested, log=Log())


async def test_missing_kernel(root: Path, tmp_path: Path, out: Path) -> None:
    with pytest.raises(NotFound, match="kernel"):
        await image.build_image(root, tmp_path / "nope", out / "g.img", size=SIZE, log=Log())
    assert list(out.iterdir()) == []


async def test_missing_root(kernel: Path, tmp_path: Path, out: Path) -> None:
    with pytest.raises(NotFound, match="root"):
        await image.build_image(tmp_path / "nope", kernel, out / "g.img", size=SIZE, log=Log())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 0}, "positive"),
        ({"size": SIZE + 1}, "whole number of MiB"),
        ({"size": 40 * MIB}, "too small"),
        ({"size": SIZE, "fmt": "vmdk"}, "not a valid DiskFormat"),
        ({"size": SIZE, "boot": "pxe"}, "not a valid BootMode"),
        ({"size": SIZE, "fs": "xfs"}, "not a valid FsType"),
        ({"size": SIZE, "cmdline_extra": "quiet\ninit=/x"}, "one line"),
        ({"size": SIZE, "boot_size": 8 * MIB}, "FAT32"),
    ],
)
async def test_bad_arguments(
    root: Path, kernel: Path, out: Path, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(InvalidArgument, match=match):
        await image.build_image(root, kernel, out / "g.img", log=Log(), **kwargs)
    assert list(out.iterdir()) == []


async def test_not_a_bzimage(root: Path, tmp_path: Path, out: Path) -> None:
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\x7fELF" + bytes(4096))
    with pytest.raises(InvalidArgument, match="bzImage"):
        await image.build_image(root, k, out / "g.img", size=SIZE, log=Log())


async def test_cmdline_extra(root: Path, kernel: Path, out: Path) -> None:
    res = await image.build_image(
        root, kernel, out / "g.img", size=SIZE, cmdline_extra="panic=-1 quiet", log=Log()
    )
    assert res.cmdline.endswith(" panic=-1 quiet")


# --- a destination filesystem that fills up ------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB ext4 on a loop device, mounted; always unmounted and detached."""
    backing = tmp_path / "small.ext4"
    with backing.open("wb") as f:
        f.truncate(64 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", "-O", "^has_journal", str(backing)], check=True)
    dev = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


async def test_no_space_before_building(root: Path, kernel: Path, small_fs: Path) -> None:
    (root / "big").write_bytes(b"\xa5" * (80 * MIB))
    with pytest.raises(NoSpace, match="free"):
        await image.build_image(root, kernel, small_fs / "g.img", size=256 * MIB, log=Log())
    assert list(small_fs.iterdir()) == [small_fs / "lost+found"]


async def test_no_space_while_filling_ext4(root: Path, tmp_path: Path, small_fs: Path) -> None:
    # The early check counts the root's data only (a lower bound); a big
    # kernel on the boot partition then leaves too little for the ext4.
    (root / "data").write_bytes(b"\xa5" * (24 * MIB))
    k = fake_kernel(tmp_path / "big-bzImage", size=40 * MIB)
    log = Log()
    with pytest.raises(NoSpace) as exc:
        await image.build_image(root, k, small_fs / "g.img", size=256 * MIB, log=log)
    assert "mke2fs" in exc.value.message
    assert "No space left on device" in exc.value.message
    assert list(small_fs.iterdir()) == [small_fs / "lost+found"]


async def test_no_space_converting_to_qcow2(root: Path, kernel: Path, small_fs: Path) -> None:
    # The raw image fits; the qcow2 copy next to it does not.
    (root / "data").write_bytes(os.urandom(36 * MIB))
    log = Log()
    with pytest.raises(NoSpace) as exc:
        await image.build_image(
            root, kernel, small_fs / "g.qcow2", size=256 * MIB, fmt="qcow2", log=log
        )
    assert "qemu-img convert" in exc.value.message
    assert list(small_fs.iterdir()) == [small_fs / "lost+found"]


async def test_root_without_etc(tmp_path: Path, kernel: Path, out: Path) -> None:
    bare = tmp_path / "bare"
    (bare / "bin").mkdir(parents=True)
    (bare / "bin/true").write_bytes(b"\x7fELF")
    res = await image.build_image(bare, kernel, out / "g.img", size=SIZE, log=Log())
    rootp = partitions(out / "g.img")["partitions"][1]
    assert f"UUID={res.root_fs_uuid}" in ext4_cat(out / "g.img", rootp["start"] * 512, "/etc/fstab")
    assert not (bare / "etc").exists()


@pytest.mark.parametrize(("size_mib", "boot_mib"), [(2048, 64), (512, 33), (512, 300)])
async def test_boot_partition_sizes(
    root: Path, kernel: Path, out: Path, size_mib: int, boot_mib: int
) -> None:
    # mkfs.fat sizes FAT clusters by the whole (sparse) file unless told:
    # on a 2 GiB disk it left a 64 MiB FAT32 too few clusters for mtools.
    res = await image.build_image(
        root,
        kernel,
        out / "g.img",
        size=size_mib * MIB,
        boot="both",
        boot_size=boot_mib * MIB,
        log=Log(),
    )
    img = out / "g.img"
    boot = partitions(img)["partitions"][0]
    assert boot["size"] * 512 == boot_mib * MIB
    assert "root=PARTUUID" in fat_cat(img, boot["start"] * 512, "/loader/entries/gentoo.conf")
    assert res.allocated_bytes < 32 * MIB
