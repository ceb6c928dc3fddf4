"""Stage3 import: good tarballs keep everything, hostile ones are refused untouched."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from autogentoo.daemon.archive import ExtractStats, extract_stage3, remove_tree
from autogentoo.errors import Conflict, InvalidArgument, MountBusy, NoSpace, UnsafeArchive
from tests.helpers import hostile
from tests.helpers.stage3 import build_tree, make_stage3, make_tarball

pytestmark = pytest.mark.integration

LIMIT = 1 << 30


@pytest.fixture
def base() -> Iterator[Path]:
    """A scratch directory removed afterwards, whatever happened."""
    path = Path(tempfile.mkdtemp(prefix="ag-archive-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def arena(base: Path) -> tuple[Path, Path]:
    """An empty target and, beside it, a canary directory that must never change."""
    dest = base / "dest"
    canary = base / "canary"
    dest.mkdir()
    canary.mkdir()
    (canary / "secret").write_text("do not touch\n")
    return dest, canary


def snapshot(path: Path) -> list[tuple[str, int, int, bytes]]:
    out = []
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        data = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        out.append((str(p.relative_to(path)), st.st_mode, st.st_nlink, data))
    return out


@pytest.mark.parametrize("case", hostile.CASES, ids=[c.name for c in hostile.CASES])
async def test_hostile_archive_is_refused(case: hostile.Case, arena: tuple[Path, Path]) -> None:
    dest, canary = arena
    tarball = case.build(dest.parent / f"{case.name}.tar", canary)
    before = snapshot(canary)
    with pytest.raises(case.error) as info:
        await extract_stage3(
            tarball,
            dest,
            max_bytes=case.limits.get("max_bytes", LIMIT),
            max_members=case.limits.get("max_members", 2_000_000),
        )
    if case.rule:
        assert info.value.details.get("rule") == case.rule, info.value.message
    assert snapshot(canary) == before
    assert list(dest.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("damage", [hostile.truncated, hostile.corrupted])
async def test_damaged_xz_is_invalid(damage: object, arena: tuple[Path, Path]) -> None:
    dest, _ = arena
    good = make_stage3(dest.parent / "good")
    bad = damage(good, dest.parent / "bad.tar.xz")  # type: ignore[operator]
    with pytest.raises(InvalidArgument, match="not a valid tar archive"):
        await extract_stage3(bad, dest, max_bytes=LIMIT)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("compression", ["xz", "zst", "gz", "bz2", None])
async def test_compressions(compression: str | None, arena: tuple[Path, Path]) -> None:
    dest, _ = arena
    tarball = make_stage3(dest.parent / "s", compression=compression, name="stage3.tar")
    seen: list[tuple[int, int]] = []
    stats = await extract_stage3(
        tarball, dest, max_bytes=LIMIT, on_progress=lambda d, t: seen.append((d, t))
    )
    assert isinstance(stats, ExtractStats)
    assert stats.compression == (compression or "tar")
    assert (dest / "etc/gentoo-release").read_text().startswith("Gentoo")
    assert os.readlink(dest / "bin/sh") == "busybox"
    total = 2 * tarball.stat().st_size
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


async def test_good_stage3_keeps_owners_modes_xattrs_caps_hardlinks(
    arena: tuple[Path, Path],
) -> None:
    dest, _ = arena
    tree = build_tree(dest.parent / "tree")
    su = tree / "usr/bin/su"
    shutil.copy2(tree / "bin/busybox", su)
    su.chmod(0o4711)
    subprocess.run(["setcap", "cap_net_raw+ep", str(tree / "bin/busybox")], check=True)
    os.setxattr(tree / "etc/hostname", "user.autogentoo.test", b"kept")
    os.chown(tree / "etc/portage/make.conf", 250, 250)
    os.chown(tree / "var/cache/distfiles", 250, 250)
    (tree / "var/cache/distfiles").chmod(0o2775)
    os.link(tree / "bin/busybox", tree / "sbin/busybox-hardlink")
    os.mknod(tree / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(tree / "dev/console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    os.mkfifo(tree / "run/initctl", 0o600)
    tarball = make_tarball(tree, dest.parent / "stage3.tar.xz")

    stats = await extract_stage3(tarball, dest, max_bytes=LIMIT)

    assert stats.members > 250
    getcap = subprocess.run(
        ["getcap", str(dest / "bin/busybox")], check=True, capture_output=True, text=True
    )
    assert "cap_net_raw=ep" in getcap.stdout
    assert os.getxattr(dest / "etc/hostname", "user.autogentoo.test") == b"kept"
    mc = (dest / "etc/portage/make.conf").stat()
    assert (mc.st_uid, mc.st_gid) == (250, 250)
    df = (dest / "var/cache/distfiles").stat()
    assert (df.st_uid, df.st_gid, stat.S_IMODE(df.st_mode)) == (250, 250, 0o2775)
    assert stat.S_IMODE((dest / "usr/bin/su").stat().st_mode) == 0o4711
    assert stat.S_IMODE((dest / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((dest / "root").stat().st_mode) == 0o700
    assert (dest / "bin/busybox").stat().st_ino == (dest / "sbin/busybox-hardlink").stat().st_ino
    null = (dest / "dev/null").lstat()
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO((dest / "run/initctl").lstat().st_mode)


async def test_absolute_symlinks_are_kept(arena: tuple[Path, Path]) -> None:
    """Absolute targets resolve inside the chroot, so a stage3 may carry them."""
    dest, _ = arena
    tree = build_tree(dest.parent / "tree")
    (tree / "etc/localtime").symlink_to("/usr/share/zoneinfo/UTC")
    (tree / "lib64").symlink_to("lib")
    (tree / "usr/lib/up").symlink_to("../../etc")
    await extract_stage3(
        make_tarball(tree, dest.parent / "s.tar.gz", compression="gz"), dest, max_bytes=LIMIT
    )
    assert os.readlink(dest / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    assert os.readlink(dest / "usr/lib/up") == "../../etc"


async def test_target_must_be_an_empty_directory(arena: tuple[Path, Path]) -> None:
    dest, _ = arena
    tarball = make_stage3(dest.parent / "s", compression="gz", name="s.tar.gz")
    with pytest.raises(InvalidArgument):
        await extract_stage3(tarball, dest / "missing", max_bytes=LIMIT)
    (dest / "x").touch()
    with pytest.raises(Conflict):
        await extract_stage3(tarball, dest, max_bytes=LIMIT)


@pytest.fixture
def small_fs(base: Path) -> Iterator[Path]:
    """An 8 MiB ext4 on a loop device, mounted; all of it undone in teardown."""
    image = base / "small.img"
    mnt = base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        subprocess.run(["mount", loop, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            if os.path.ismount(mnt):
                subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


async def test_full_disk_is_no_space(small_fs: Path, base: Path) -> None:
    tree = build_tree(base / "tree")
    (tree / "usr/lib/big.bin").write_bytes(os.urandom(16 << 20))
    tarball = make_tarball(tree, base / "big.tar.zst", compression="zst")
    dest = small_fs / "root"
    dest.mkdir()
    with pytest.raises(NoSpace):
        await extract_stage3(tarball, dest, max_bytes=LIMIT)
    await remove_tree(dest)
    assert not dest.exists()


async def test_remove_tree_never_follows_links_or_mounts(arena: tuple[Path, Path]) -> None:
    dest, canary = arena
    (dest / "etc").mkdir()
    (dest / "etc/out").symlink_to(canary)
    (dest / "rel").symlink_to("../canary")
    await remove_tree(dest)
    assert not dest.exists()
    assert (canary / "secret").read_text() == "do not touch\n"

    dest.mkdir()
    (dest / "bind").mkdir()
    subprocess.run(["mount", "--bind", str(canary), str(dest / "bind")], check=True)
    try:
        with pytest.raises(MountBusy):
            await remove_tree(dest)
        assert (canary / "secret").exists()
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", str(dest / "bind")], check=True)
    await remove_tree(dest)
    assert not dest.exists()


async def test_symlink_chain_of_forty_is_allowed(arena: tuple[Path, Path]) -> None:
    """The kernel follows 40 links; the importer refuses only what it would not."""
    dest, _ = arena
    path = dest.parent / "chain.tar"
    with tarfile.open(path, "w") as tf:
        for i in range(39):
            info = tarfile.TarInfo(f"l{i}")
            info.type, info.linkname = tarfile.SYMTYPE, f"l{i + 1}"
            tf.addfile(info)
        last = tarfile.TarInfo("l39")
        last.type, last.linkname = tarfile.SYMTYPE, "."
        tf.addfile(last)
    await extract_stage3(path, dest, max_bytes=LIMIT)
    assert os.path.isdir(dest / "l0")


async def test_unsafe_archive_names_the_member(arena: tuple[Path, Path]) -> None:
    dest, canary = arena
    tarball = hostile.symlink_then_file(dest.parent / "x.tar.gz", canary)
    with pytest.raises(UnsafeArchive) as info:
        await extract_stage3(tarball, dest, max_bytes=LIMIT)
    assert "escape/pwned" in info.value.message
    assert info.value.details["member"] == "./escape/pwned"
