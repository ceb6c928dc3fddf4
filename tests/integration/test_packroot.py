"""pack-root against the real tools: GNU cpio extracts it, the decompressors read it.

Runs as root (device nodes, owners, a loop-mounted filesystem for ENOSPC).
The expected tree is computed here, independently of packroot's merge: every
layer is read with os.walk into {path: description}, merged with dict
updates, and compared with what `cpio -idm` extracted.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from autogentoo.daemon import cpio
from autogentoo.daemon.packroot import (
    Compression,
    Layer,
    PackOptions,
    fingerprint,
    pack_layers,
    pack_member,
    pack_single,
    plan,
)
from autogentoo.errors import InvalidArgument, NoSpace, NotFound

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (device nodes, owners, mounts)"),
]

EPOCH = 1_700_000_000
EXCLUDES = ("var/cache/*", "!var/cache/keep", "proc/*", "dev/*", "usr/share/doc/*")
NL = b"new\nline"
BAD = b"bad\xffname"


def opts(compress: Compression = Compression.NONE, **kw: object) -> PackOptions:
    return PackOptions(epoch=EPOCH, compress=compress, excludes=EXCLUDES, **kw)  # type: ignore[arg-type]


def w(path: Path, data: bytes | str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)
    return path


@pytest.fixture
def layers(tmp_path: Path) -> Iterator[list[Layer]]:
    root, common, hw = tmp_path / "root", tmp_path / "common", tmp_path / "hw"
    w(root / "init", "#!/bin/sh\n", 0o755)
    w(root / "etc/passwd", "root:x:0:0::/root:/bin/sh\n")
    w(root / "etc/replaced", "from root\n")
    w(root / "etc/hosts", "127.0.0.1 localhost\n")
    os.chown(root / "etc/hosts", 123, 456)
    w(root / "usr/bin/su", b"\x7fELF suid", 0o4755)
    w(root / "usr/bin/wall", b"\x7fELF sgid", 0o2755)
    big = bytes(range(256)) * 2048  # 512 KiB: goes through sendfile
    w(root / "usr/lib/big.so", big)
    os.link(root / "usr/lib/big.so", root / "usr/lib64-big.so")  # hardlink across dirs
    w(root / "usr/share/doc/README", "excluded\n")
    w(root / "var/cache/junk/x", "excluded\n")
    w(root / "var/cache/keep/y", "re-included\n")
    w(root / "proc/1/status", "excluded\n")
    w(root / "dev/sda", "excluded\n")
    w(root / "opt/tree/deep/file", "dropped with its directory\n")
    w(root / "etc/to-link", "replaced by a symlink\n")
    os.symlink("/etc/shadow", root / "etc/evil")
    os.symlink("../../etc/passwd", root / "usr/bin/pw-link")
    os.mkfifo(root / "etc/fifo")
    os.mknod(root / "etc/blk", stat.S_IFBLK | 0o660, os.makedev(8, 1))
    os.mknod(root / "etc/chr", stat.S_IFCHR | 0o620, os.makedev(4, 64))
    w(root / "etc/with space", "s\n")
    w(root / os.fsdecode(b"etc/" + NL), "nl\n")
    w(root / os.fsdecode(b"etc/" + BAD), "bad\n")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.fsencode(root / "etc/sock"))
    sock.close()
    w(common / "etc/replaced", "from common\n", 0o600)
    w(common / "etc/common.conf", "common\n")
    w(common / "opt/tree", "a file where root had a directory\n")
    os.chmod(common / "etc", 0o700)
    w(hw / "etc/hw.conf", "hardware\n")
    w(hw / "var/cache/other", "excluded in overlays too\n")
    os.symlink("passwd", hw / "etc/to-link")
    os.chmod(hw / "etc", 0o750)
    yield [Layer("root", root), Layer("common", common), Layer("hw", hw)]


# --- the expectation, built without packroot ------------------------------------


def _excluded(rel: bytes) -> bool:
    parts = rel.split(b"/")
    for depth in range(1, len(parts)):
        parent, child = b"/".join(parts[:depth]), parts[depth]
        if parent == b"var/cache" and child != b"keep":
            return True
        if parent in (b"proc", b"dev", b"usr/share/doc"):
            return True
    return False


def _describe(path: bytes) -> tuple[object, ...]:
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    extra: object = None
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            extra = f.read()
    elif stat.S_ISLNK(st.st_mode):
        extra = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
    perm = None if stat.S_ISLNK(st.st_mode) else stat.S_IMODE(st.st_mode)
    return (kind, perm, st.st_uid, st.st_gid, extra)


def _tree(top: Path) -> dict[bytes, tuple[object, ...]]:
    out = {}
    base = os.fsencode(top)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, base)
            if stat.S_ISSOCK(os.lstat(full).st_mode):
                continue
            out[rel] = _describe(full)
    return out


def expected(layers: list[Layer]) -> dict[bytes, tuple[object, ...]]:
    merged: dict[bytes, tuple[object, ...]] = {
        b"dev": (stat.S_IFDIR, 0o755, 0, 0, None),
        b"dev/console": (stat.S_IFCHR, 0o600, 0, 0, (5, 1)),
        b"dev/null": (stat.S_IFCHR, 0o666, 0, 0, (1, 3)),
        b"proc": (stat.S_IFDIR, 0o555, 0, 0, None),
        b"sys": (stat.S_IFDIR, 0o555, 0, 0, None),
        b"run": (stat.S_IFDIR, 0o755, 0, 0, None),
        b"tmp": (stat.S_IFDIR, 0o1777, 0, 0, None),
    }
    for layer in layers:
        for rel, desc in sorted(_tree(layer.path).items()):
            if _excluded(rel):
                continue
            old = merged.get(rel)
            if old is not None and old[0] == stat.S_IFDIR and desc[0] != stat.S_IFDIR:
                merged = {k: v for k, v in merged.items() if not k.startswith(rel + b"/")}
            merged[rel] = desc
    return merged


def extract(archive: bytes, dest: Path, *, update: bool = False) -> None:
    dest.mkdir(exist_ok=True)
    argv = ["cpio", "-idm", "--no-absolute-filenames", "--quiet"]
    if update:
        argv.append("-u")
    subprocess.run(argv, input=archive, cwd=dest, check=True, capture_output=True)


DECOMPRESS = {
    Compression.GZIP: ["gzip", "-dc"],
    Compression.ZSTD: ["zstd", "-dc"],
    Compression.XZ: ["xz", "-dc"],
    Compression.LZ4: ["lz4", "-dc"],
}


def decompress(path: Path, compress: Compression) -> bytes:
    if compress is Compression.NONE:
        return path.read_bytes()
    return subprocess.run(
        [*DECOMPRESS[compress], str(path)], check=True, capture_output=True
    ).stdout


# --- tests -------------------------------------------------------------------------


def test_single_archive_extracts_to_the_expected_merge(layers: list[Layer], tmp_path: Path) -> None:
    r = pack_single(layers, opts(), tmp_path / "out.cpio")
    data = r.path.read_bytes()
    assert r.size == len(data) and len(data) % 512 == 0
    extract(data, tmp_path / "x")
    got = _tree(tmp_path / "x")
    want = expected(layers)
    assert sorted(got) == sorted(want)
    for path, desc in want.items():
        assert got[path] == desc, path
    # the setuid/setgid bits survived, owners are numeric
    assert got[b"usr/bin/su"][1] == 0o4755
    assert got[b"usr/bin/wall"][1] == 0o2755
    assert got[b"etc/hosts"][2:4] == (123, 456)
    # later layer's directory metadata wins
    assert got[b"etc"][1] == 0o750
    # the hardlink is a hardlink again
    x = tmp_path / "x"
    assert (x / "usr/lib/big.so").stat().st_ino == (x / "usr/lib64-big.so").stat().st_ino
    # mtimes clamped to the epoch
    assert max(os.lstat(x / p).st_mtime for p in ("init", "etc/passwd")) <= EPOCH
    # init exists; the socket was skipped, with a warning
    assert [msg for msg in r.warnings if "/init" in msg] == []
    assert any("socket" in msg and "etc/sock" in msg for msg in r.warnings)


def test_archive_layout(layers: list[Layer], tmp_path: Path) -> None:
    r = pack_single(layers, opts(), tmp_path / "out.cpio")
    entries = list(cpio.iter_newc(r.path.read_bytes()))
    names = [e.name for e in entries]
    # parents before children, no "." and no leading "./"
    assert b"." not in names and not any(n.startswith((b"./", b"/")) for n in names)
    seen: set[bytes] = set()
    for n in names:
        if b"/" in n:
            assert n.rsplit(b"/", 1)[0] in seen, n
        seen.add(n)
    assert names == sorted(names, key=lambda n: n.split(b"/"))
    by = {e.name: e for e in entries}
    # the symlink out of the root is a link; /etc/shadow was never read
    evil = by[b"etc/evil"]
    assert stat.S_ISLNK(evil.mode) and evil.data == b"/etc/shadow"
    # hardlink group: same ino, nlink 2, data only on the last entry
    a, b = by[b"usr/lib/big.so"], by[b"usr/lib64-big.so"]
    assert a.ino == b.ino and a.nlink == b.nlink == 2
    first, last = sorted((a, b), key=lambda e: names.index(e.name))
    assert first.data == b"" and len(last.data) == 512 * 1024
    # inodes numbered in archive order, device fields zero, mtimes clamped
    inos = [e.ino for e in entries]
    assert len(set(inos)) == len(inos) - 1
    assert all(e.devmajor == 0 == e.devminor for e in entries)
    assert all(e.mtime <= EPOCH for e in entries)
    assert by[b"dev/console"].rdevmajor == 5 and by[b"dev/console"].rdevminor == 1
    assert by[b"etc/" + NL].data == b"nl\n" and by[b"etc/" + BAD].data == b"bad\n"
    assert b"etc/sock" not in by
    # directory nlink is 2 + archived subdirectories
    assert by[b"usr"].nlink == 2 + sum(
        1 for e in entries if e.is_dir and e.name.count(b"/") == 1 and e.name.startswith(b"usr/")
    )


def test_layered_members_extract_to_the_same_tree(layers: list[Layer], tmp_path: Path) -> None:
    single = pack_single(layers, opts(), tmp_path / "single.cpio")
    extract(single.path.read_bytes(), tmp_path / "single")
    for k in range(len(layers)):
        m = pack_member(k, layers, opts(), tmp_path / f"m{k}.cpio")
        # GNU cpio stops at the first trailer: feed the members one by one, like the kernel.
        extract(m.path.read_bytes(), tmp_path / "layered", update=True)
    assert _tree(tmp_path / "layered") == _tree(tmp_path / "single")
    # no member carries a path a later member also carries, except directories
    names: dict[bytes, int] = {}
    for k in range(len(layers)):
        for e in cpio.iter_newc((tmp_path / f"m{k}.cpio").read_bytes()):
            if not e.is_dir:
                assert e.name not in names, e.name
                names[e.name] = k
    assert names[b"etc/replaced"] == 1 and names[b"etc/to-link"] == 2
    assert b"opt/tree/deep/file" not in names


def test_same_inputs_same_bytes_and_a_touch_changes_them(
    layers: list[Layer], tmp_path: Path
) -> None:
    o = opts(Compression.GZIP)
    one = pack_single(layers, o, tmp_path / "1.gz")
    two = pack_single(layers, o, tmp_path / "2.gz")
    assert one.sha256 == two.sha256
    assert one.path.read_bytes() == two.path.read_bytes()
    fps = [fingerprint(layer, o) for layer in layers]
    os.utime(layers[0].path / "etc/passwd", (EPOCH - 100, EPOCH - 100))
    three = pack_single(layers, o, tmp_path / "3.gz")
    assert three.sha256 != one.sha256 and three.fingerprint != one.fingerprint
    assert [fingerprint(layer, o) for layer in layers][1:] == fps[1:]
    assert fingerprint(layers[0], o) != fps[0]


def test_member_cache_repacks_only_the_changed_layer(layers: list[Layer], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    o = opts(Compression.GZIP)
    first = pack_layers(layers, o, cache)
    assert not first.cached and not any(m.cached for m in first.members)
    again = pack_layers(layers, o, cache)
    assert again.cached and again.sha256 == first.sha256
    w(layers[2].path / "etc/hw.conf", "hardware v2\n")
    third = pack_layers(layers, o, cache)
    assert not third.cached
    assert [m.cached for m in third.members] == [True, True, False]
    assert third.sha256 != first.sha256
    # the concatenation decompresses to the members one after the other
    whole = decompress(third.path, Compression.GZIP)
    parts = b"".join(decompress(m.path, Compression.GZIP) for m in third.members)
    assert whole == parts
    # adding a path that shadows a root file changes the root member's fingerprint too
    before = plan(layers, o).member_fingerprints
    w(layers[2].path / "etc/passwd", "hw passwd\n")
    after = plan(layers, o).member_fingerprints
    assert before[0] != after[0] and before[1] == after[1] and before[2] != after[2]


@pytest.mark.parametrize("compress", [c for c in Compression if c is not Compression.NONE])
def test_every_compression_decompresses_with_the_standard_tool(
    layers: list[Layer], tmp_path: Path, compress: Compression
) -> None:
    plain = pack_single(layers, opts(), tmp_path / "plain.cpio").path.read_bytes()
    r = pack_single(layers, opts(compress), tmp_path / f"out{compress.suffix}")
    assert decompress(r.path, compress) == plain
    again = pack_single(layers, opts(compress), tmp_path / f"again{compress.suffix}")
    assert again.sha256 == r.sha256


def test_lz4_is_the_legacy_format_and_xz_uses_crc32(layers: list[Layer], tmp_path: Path) -> None:
    lz4 = pack_single(layers, opts(Compression.LZ4), tmp_path / "o.lz4").path.read_bytes()
    assert lz4[:4] == bytes.fromhex("02214c18")  # the kernel's unlz4 wants this magic
    xz = pack_single(layers, opts(Compression.XZ), tmp_path / "o.xz").path.read_bytes()
    assert xz[:6] == b"\xfd7zXZ\0" and xz[7] == 0x01  # stream flags: check type 1 = CRC32


def test_bad_level_is_refused(layers: list[Layer], tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="1 to 9"):
        pack_single(layers, opts(Compression.GZIP, level=11), tmp_path / "o.gz")
    assert list(tmp_path.glob("o.gz*")) == []


def test_missing_layer_is_not_found(layers: list[Layer], tmp_path: Path) -> None:
    gone = Layer("secret-sauce", tmp_path / "nope")
    with pytest.raises(NotFound, match="secret-sauce"):
        pack_single([*layers, gone], opts(), tmp_path / "o.cpio")
    assert not (tmp_path / "o.cpio").exists()


def test_missing_init_warns_with_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "root"
    w(root / "etc/x", "x")
    r = pack_single([Layer("root", root)], opts(), tmp_path / "o.cpio")
    assert any("/init" in msg and "rdinit=" in msg for msg in r.warnings)


@contextlib.contextmanager
def mounted(kind: list[str], target: Path) -> Iterator[None]:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *kind, str(target)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(target)], check=True, capture_output=True)


def test_other_filesystems_are_not_entered(tmp_path: Path) -> None:
    root = tmp_path / "root"
    w(root / "init", "x", 0o755)
    mnt = root / "mnt/other"
    with mounted(["-t", "tmpfs", "-o", "size=1m", "tmpfs"], mnt):
        w(mnt / "inside", "on another filesystem")
        r = pack_single([Layer("root", root)], opts(), tmp_path / "o.cpio")
    names = {e.name for e in cpio.iter_newc(r.path.read_bytes())}
    assert b"mnt/other" in names and b"mnt/other/inside" not in names


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB ext4 on a loop device, detached whatever happens."""
    img = tmp_path / "small.img"
    with open(img, "wb") as f:
        f.truncate(4 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    dev = subprocess.run(
        ["losetup", "-f", "--show", str(img)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        mnt = tmp_path / "small"
        with mounted([dev], mnt):
            yield mnt
    finally:
        subprocess.run(["losetup", "-d", dev], check=True, capture_output=True)


@pytest.mark.parametrize("compress", [Compression.NONE, Compression.GZIP])
def test_full_disk_is_nospace_and_leaves_nothing(
    small_fs: Path, tmp_path: Path, compress: Compression
) -> None:
    root = tmp_path / "root"
    w(root / "init", "x", 0o755)
    # incompressible, and bigger than the filesystem
    w(root / "blob", os.urandom(8 << 20))
    before = set(small_fs.iterdir())
    with pytest.raises(NoSpace):
        pack_single([Layer("root", root)], opts(compress), small_fs / f"o.cpio{compress.suffix}")
    assert set(small_fs.iterdir()) == before
