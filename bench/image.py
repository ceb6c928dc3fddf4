"""Disk image creation: image.build_image against the seed's loop-mount way.

    /opt/autogentoo/venv/bin/python bench/image.py [--root DIR] [--size-mib N]

One root, three ways, in one run:
  ours     build_image: sfdisk, mkfs.fat + mtools + syslinux --offset,
           mke2fs -d -E offset (straight into the image), debugfs for fstab,
           e2fsck -n, sha256 + md5 of the image (timed separately too)
  ours-dd  the same ext4 built in a separate file, then dd conv=notrunc,sparse
           into the image (the alternative to -E offset; ext4 part only)
  seed     fallocate, losetup -P, sfdisk, mkfs.ext4 -O ^64bit, mount, cp -a,
           extlinux --install, umount, losetup -d (seed 2's way)
Without --root, the root is a busybox stage3-shaped tree plus copies of
/usr/lib/python3.11, /usr/share/locale and /usr/share/doc (about 400 MiB,
20k+ files). The "kernel" is an 8 MiB stand-in (nothing is booted). Each way
ends with its image fsync'ed. Prints times, sizes and ratios; asserts
nothing; removes everything it made (the loop device and mount included).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autogentoo.daemon import image, imagefs
from autogentoo.daemon.imagefs import MIB
from tests.helpers.kernel import cache_dir
from tests.helpers.stage3 import build_tree

EXTRA = ("/usr/lib/python3.11", "/usr/share/locale", "/usr/share/doc")


def du(path: Path, *, apparent: bool) -> int:
    argv = ["du", "-s", "-B1", *(["--apparent-size"] if apparent else []), str(path)]
    return int(subprocess.run(argv, check=True, capture_output=True, text=True).stdout.split()[0])


def make_root(dest: Path) -> Path:
    build_tree(dest)
    for src in EXTRA:
        target = dest / src.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", src, str(target)], check=True)
    return dest


def row(name: str, seconds: float, ratio: str = "") -> None:
    print(f"  {name:44} {seconds:8.2f}  {ratio}")


def fake_kernel(path: Path) -> Path:
    data = bytearray(os.urandom(8 * MIB))
    data[0:2] = b"MZ"
    data[0x3C:0x40] = (0x80).to_bytes(4, "little")
    data[0x80:0x84] = b"PE\0\0"
    data[0x202:0x206] = b"HdrS"
    path.write_bytes(bytes(data))
    return path


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run(*argv: str, input: str | None = None) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, input=input).stdout


def seed_way(root: Path, kernel: Path, img: Path, size: int, work: Path) -> float:
    """The old script's steps, each undone in reverse on the way out."""
    mnt = work / "mnt"
    mnt.mkdir()
    t0 = time.monotonic()
    run("fallocate", "-l", str(size), str(img))
    dev = run("losetup", "-f", "--show", "-P", str(img)).strip()
    mounted = False
    try:
        run("sfdisk", "-q", dev, input="label: dos\nstart=2048, type=83, bootable\n")
        run("partx", "-u", dev)
        part = f"{dev}p1"
        for _ in range(100):  # udev may lag behind the new partition node
            if Path(part).exists():
                break
            time.sleep(0.05)
        run("mkfs.ext4", "-q", "-O", "^64bit", part)
        run("mount", part, str(mnt))
        mounted = True
        run("cp", "-a", f"{root}/.", str(mnt))
        (mnt / "boot/extlinux").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kernel, mnt / "boot/vmlinuz")
        (mnt / "boot/extlinux/extlinux.conf").write_text(
            "DEFAULT gentoo\nLABEL gentoo\n  LINUX /boot/vmlinuz\n"
            "  APPEND root=/dev/vda1 console=ttyS0\n"
        )
        (mnt / "etc/fstab").write_text("/dev/vda1 / ext4 defaults 0 1\n")
        run("extlinux", "--install", str(mnt / "boot/extlinux"))
        mbr = Path("/usr/lib/syslinux/mbr/mbr.bin").read_bytes()
        with open(dev, "r+b") as f:
            f.write(mbr[:440])
    finally:
        if mounted:
            run("umount", str(mnt))
        run("losetup", "-d", dev)
    fsync(img)
    return time.monotonic() - t0


async def ours_dd_ext4(root: Path, img: Path, size: int, work: Path) -> tuple[float, float]:
    """The ext4 part only: -E offset into the image vs a separate file + dd."""
    layout = image.plan_layout(size, image.DEFAULT_BOOT_SIZE)
    scan = imagefs.scan_root(root)
    plan = imagefs.plan(scan, layout.root_size, image_size=size, root=root)

    def quiet(_: bytes) -> None:
        pass

    with open(img, "wb") as f:
        f.truncate(size)
    t0 = time.monotonic()
    await imagefs.make_ext4(
        img, root, plan, offset=layout.root_start, uuid=layout.root_fs_uuid, label="r", log=quiet
    )
    fsync(img)
    t_offset = time.monotonic() - t0
    img.unlink()

    with open(img, "wb") as f:
        f.truncate(size)
    part = work / "part.ext4"
    with open(part, "wb") as f:
        f.truncate(layout.root_size)
    t0 = time.monotonic()
    await imagefs.make_ext4(
        part, root, plan, offset=0, uuid=layout.root_fs_uuid, label="r", log=quiet
    )
    run(
        "dd",
        f"if={part}",
        f"of={img}",
        "bs=1M",
        f"seek={layout.root_start // MIB}",
        "conv=notrunc,sparse",
        "status=none",
    )
    fsync(img)
    t_dd = time.monotonic() - t0
    part.unlink()
    img.unlink()
    return t_offset, t_dd


async def main(root_arg: Path | None, size: int) -> None:
    bench = Path(tempfile.mkdtemp(prefix="bench-image.", dir=cache_dir()))
    try:
        root = root_arg or make_root(bench / "root")
        kernel = fake_kernel(bench / "bzImage")
        r_app, r_alloc = du(root, apparent=True), du(root, apparent=False)
        files = sum(len(d) + len(f) for _, d, f in os.walk(root))
        print(f"root: {root} {files} entries")
        print(f"      {r_app / MIB:.1f} MiB apparent, {r_alloc / MIB:.1f} MiB allocated")
        subprocess.run(["sync"], check=True)

        # Seed first: ours must not profit from a page cache it warmed.
        seed_img = bench / "seed.img"
        t_seed = seed_way(root, kernel, seed_img, size, bench)
        s_app, s_alloc = seed_img.stat().st_size, seed_img.stat().st_blocks * 512
        seed_img.unlink()

        logs: list[bytes] = []
        ours_img = bench / "ours.img"
        t0 = time.monotonic()
        res = await image.build_image(
            root, kernel, ours_img, size=size, boot="both", log=logs.append
        )
        t_ours = time.monotonic() - t0
        text = b"".join(logs).decode()
        m = re.search(r"== checksums: ([0-9.]+)s", text)
        t_hash = float(m.group(1)) if m else 0.0
        o_app, o_alloc = res.apparent_bytes, res.allocated_bytes
        ours_img.unlink()
        res.properties_path.unlink()

        qlogs: list[bytes] = []
        t0 = time.monotonic()
        q = await image.build_image(
            root,
            kernel,
            bench / "ours.qcow2",
            size=size,
            fmt="qcow2",
            boot="both",
            log=qlogs.append,
        )
        t_qcow2 = time.monotonic() - t0
        q_alloc = q.allocated_bytes
        q.path.unlink()
        q.properties_path.unlink()

        t_off, t_dd = await ours_dd_ext4(root, bench / "ext4only.img", size, bench)

        bare = t_ours - t_hash
        print(f"image size {size // MIB} MiB; times in seconds")
        row("seed (loop mount, cp -a, extlinux)", t_seed)
        row(
            f"ours raw (incl. sha256+md5 {t_hash:.2f}s)", t_ours, f"seed/ours {t_seed / t_ours:.2f}"
        )
        row("ours raw without checksums", bare, f"seed/ours {t_seed / bare:.2f}")
        row("ours qcow2 (incl. checksums)", t_qcow2)
        row("ext4 only: mke2fs -E offset", t_off)
        row("ext4 only: separate file + dd sparse", t_dd, f"dd/offset {t_dd / t_off:.2f}")
        print("sizes in MiB: apparent, allocated, allocated/root's allocated")
        for name, app, alloc in (
            ("root", r_app, r_alloc),
            ("seed raw", s_app, s_alloc),
            ("ours raw", o_app, o_alloc),
            ("ours qcow2", q.apparent_bytes, q_alloc),
        ):
            print(f"  {name:12} {app / MIB:10.1f} {alloc / MIB:10.1f} {alloc / r_alloc:8.2f}")
    finally:
        shutil.rmtree(bench, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, help="an existing tree to image (only read)")
    ap.add_argument("--size-mib", type=int, default=2048)
    args = ap.parse_args()
    asyncio.run(main(args.root, args.size_mib * MIB))
