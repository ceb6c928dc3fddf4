"""Nothing is ever read or written outside a root, whatever the root contains."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from autogentoo.daemon import pathsafe
from autogentoo.daemon.pathsafe import (
    RootDir,
    makedirs_in_root,
    open_in_root,
    read_file_in_root,
    write_file_in_root,
)
from autogentoo.errors import BackendUnavailable, Conflict, TooLarge, UnsafePath

pytestmark = pytest.mark.integration

SECRET = b"host secret\n"


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ag-pathsafe-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def root(base: Path) -> Path:
    r = base / "root"
    for d in ("etc", "usr/lib", "var/tmp"):
        (r / d).mkdir(parents=True)
    (r / "etc/hostname").write_bytes(b"inside\n")
    (base / "canary").mkdir()
    (base / "canary/secret").write_bytes(SECRET)
    return r


def canary_state(base: Path) -> list[tuple[str, bytes]]:
    c = base / "canary"
    return sorted(
        (str(p.relative_to(c)), p.read_bytes() if p.is_file() and not p.is_symlink() else b"")
        for p in c.rglob("*")
    )


@contextlib.contextmanager
def bind(src: Path, dst: Path) -> Iterator[None]:
    dst.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(dst)], check=True)


def test_write_read_and_owner(root: Path) -> None:
    with RootDir(root) as r:
        write_file_in_root(r.fd, "/etc/resolv.conf", b"nameserver 10.0.0.1\n", 0o640, 250, 5)
        assert read_file_in_root(r.fd, "etc/resolv.conf", 100) == b"nameserver 10.0.0.1\n"
        write_file_in_root(r.fd, "etc/resolv.conf", b"v2\n")  # replaced atomically
    st = (root / "etc/resolv.conf").stat()
    assert (root / "etc/resolv.conf").read_bytes() == b"v2\n"
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644)
    assert not [p for p in (root / "etc").iterdir() if ".agtmp-" in p.name]


def test_mode_and_owner_are_applied(root: Path) -> None:
    with RootDir(root) as r:
        write_file_in_root(r.fd, "var/tmp/job.sh", b"#!/bin/sh\n", 0o4750, 250, 250)
    st = (root / "var/tmp/job.sh").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (250, 250, 0o4750)


@pytest.mark.parametrize(
    "target", ["ABS_CANARY", "../canary", "../../../../canary", "/../../canary"]
)
def test_symlinked_directory_stays_inside(root: Path, base: Path, target: str) -> None:
    target = str(base / "canary") if target == "ABS_CANARY" else target
    (root / "etc/portage").symlink_to(target)
    before = canary_state(base)
    with RootDir(root) as r:
        with pytest.raises((FileNotFoundError, UnsafePath)):
            write_file_in_root(r.fd, "etc/portage/make.conf", b"pwned")
        with pytest.raises((FileNotFoundError, UnsafePath)):
            read_file_in_root(r.fd, "etc/portage/secret", 100)
        with pytest.raises((FileNotFoundError, UnsafePath)):
            write_file_in_root(r.fd, "etc/portage/make.conf", b"pwned", make_parents=True)
    assert canary_state(base) == before


def test_symlink_resolves_as_in_the_chroot(root: Path, base: Path) -> None:
    """A root's absolute link means the root's own path, never the host's."""
    (root / "canary").mkdir()
    (root / "canary/secret").write_bytes(b"inside secret")
    (root / "etc/link").symlink_to(str(base / "canary"))
    (root / "usr/lib/up").symlink_to("../../../../../../../canary")
    (root / base.relative_to("/")).mkdir(parents=True)
    (root / base.relative_to("/") / "canary").symlink_to("/canary")
    with RootDir(root) as r:
        assert read_file_in_root(r.fd, "etc/link/secret", 100) == b"inside secret"
        assert read_file_in_root(r.fd, "usr/lib/up/secret", 100) == b"inside secret"


def test_final_symlink_is_replaced_not_followed(root: Path, base: Path) -> None:
    (root / "etc/resolv.conf").symlink_to(str(base / "canary/secret"))
    (root / "etc/hostname-link").symlink_to("hostname")
    before = canary_state(base)
    with RootDir(root) as r:
        write_file_in_root(r.fd, "etc/resolv.conf", b"nameserver 1.1.1.1\n")
        with pytest.raises(UnsafePath):
            open_in_root(r.fd, "etc/hostname-link", os.O_RDONLY, follow_final=False)
    assert not (root / "etc/resolv.conf").is_symlink()
    assert canary_state(base) == before


def test_dotdot_in_relpath_is_refused(root: Path) -> None:
    with RootDir(root) as r:
        for bad in ("../canary/secret", "etc/../../canary/secret", "etc/..", "a\0b"):
            with pytest.raises(UnsafePath):
                open_in_root(r.fd, bad, os.O_RDONLY)
            with pytest.raises(UnsafePath):
                write_file_in_root(r.fd, bad, b"x")
        with pytest.raises(UnsafePath):
            write_file_in_root(r.fd, "/", b"x")


def test_no_symlinks_mode(root: Path) -> None:
    (root / "lib").symlink_to("usr/lib")
    with RootDir(root) as r:
        fd = open_in_root(r.fd, "lib", os.O_PATH | os.O_DIRECTORY)
        os.close(fd)
        with pytest.raises(UnsafePath):
            open_in_root(r.fd, "lib", os.O_PATH | os.O_DIRECTORY, no_symlinks=True)


def test_makedirs(root: Path, base: Path) -> None:
    (root / "lib").symlink_to("usr/lib")  # merged-usr: followed, inside the root
    (root / "etc/evil").symlink_to(str(base / "canary"))  # dangling in the root: refused
    (root / "etc/file").write_text("x")
    with RootDir(root) as r:
        os.close(makedirs_in_root(r.fd, "lib/modules/6.1.0", 0o700))
        assert stat.S_IMODE((root / "usr/lib/modules/6.1.0").stat().st_mode) == 0o700
        os.close(makedirs_in_root(r.fd, "lib/modules/6.1.0"))  # exists: fine
        with pytest.raises(UnsafePath, match="symlink"):
            makedirs_in_root(r.fd, "etc/evil/sub")
        with pytest.raises(Conflict):
            makedirs_in_root(r.fd, "etc/file/sub")
    assert canary_state(base) == [("secret", SECRET)]


def test_directory_target_is_refused(root: Path) -> None:
    with RootDir(root) as r, pytest.raises(Conflict):
        write_file_in_root(r.fd, "usr/lib", b"x")


def test_read_refuses_special_files_and_limits(root: Path) -> None:
    os.mkfifo(root / "etc/fifo")
    os.mknod(root / "etc/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "etc/big").write_bytes(b"x" * 1000)
    with RootDir(root) as r:
        with pytest.raises(UnsafePath, match="not a regular file"):
            read_file_in_root(r.fd, "etc/fifo", 100)  # and does not block on open
        with pytest.raises(UnsafePath, match="not a regular file"):
            read_file_in_root(r.fd, "etc/null", 100)
        with pytest.raises(TooLarge):
            read_file_in_root(r.fd, "etc/big", 999)
        assert len(read_file_in_root(r.fd, "etc/big", 1000)) == 1000


def test_magic_links_are_refused(root: Path, base: Path) -> None:
    (root / "proc").mkdir()
    with bind(Path("/proc"), root / "proc"), RootDir(root) as r:
        # mounts are not crossed by default...
        with pytest.raises(UnsafePath):
            read_file_in_root(r.fd, "proc/self/root/etc/hostname", 100)
        # ...and even when they are, /proc/self/root and friends are refused
        for magic in ("proc/self/root/etc/hostname", "proc/self/cwd", "proc/self/exe"):
            with pytest.raises(UnsafePath):
                fd = open_in_root(r.fd, magic, os.O_RDONLY, cross_mounts=True)
                os.close(fd)
        (root / "etc/magic").symlink_to("/proc/self/root/etc")
        with pytest.raises(UnsafePath):
            read_file_in_root(r.fd, "etc/magic/hostname", 100)


def test_bind_mount_inside_root_is_not_crossed(root: Path, base: Path) -> None:
    before = canary_state(base)
    with bind(base / "canary", root / "var/cache"), RootDir(root) as r:
        with pytest.raises(UnsafePath):
            write_file_in_root(r.fd, "var/cache/pwned", b"x")
        with pytest.raises(UnsafePath):
            read_file_in_root(r.fd, "var/cache/secret", 100)
    assert canary_state(base) == before


_libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> None:
    """renameat2(RENAME_EXCHANGE): both names always exist, their inodes swap atomically."""
    if _libc.renameat2(-100, bytes(a), -100, bytes(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_swapped_symlink_race(root: Path, base: Path) -> None:
    """`work` flips between a directory and a link pointing out, as fast as it can."""
    before = canary_state(base)
    work = root / "work"
    work.mkdir()
    (work / "secret").write_bytes(b"inside")
    (root / "work.abs").symlink_to(str(base / "canary"))
    (root / "work.rel").symlink_to("../canary")
    stop = threading.Event()

    def swapper() -> None:
        while not stop.is_set():
            exchange(work, root / "work.abs")
            exchange(work, root / "work.abs")
            exchange(work, root / "work.rel")
            exchange(work, root / "work.rel")

    t = threading.Thread(target=swapper)
    t.start()
    outcomes: dict[str, int] = {}

    def attempt(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
            key = f"{what}: ok"
        except (FileNotFoundError, UnsafePath, Conflict) as e:
            key = f"{what}: {type(e).__name__}"
        outcomes[key] = outcomes.get(key, 0) + 1

    try:
        with RootDir(root) as r:
            for i in range(3000):
                attempt("write", partial(write_file_in_root, r.fd, f"work/f{i % 7}", b"data"))
                attempt(
                    "read",
                    lambda: (
                        read_file_in_root(r.fd, "work/secret", 100) == b"inside"
                        or pytest.fail("read something other than the root's file")
                    ),
                )
                attempt("makedirs", lambda: os.close(makedirs_in_root(r.fd, "work/d/e")))
    finally:
        stop.set()
        t.join()
    assert canary_state(base) == before
    assert outcomes.get("write: ok", 0) > 0 and outcomes.get("write: FileNotFoundError", 0) > 0
    print("race outcomes:", dict(sorted(outcomes.items())))


def test_missing_openat2_is_a_clear_error(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Mocked: this kernel has openat2, so an unused syscall number stands in for
    # a kernel without it (both return ENOSYS).
    monkeypatch.setattr(pathsafe, "SYS_OPENAT2", 1023)
    with RootDir(root) as r, pytest.raises(BackendUnavailable, match="openat2"):
        open_in_root(r.fd, "etc/hostname", os.O_RDONLY)
    with pytest.raises(BackendUnavailable):
        pathsafe.check_openat2()
