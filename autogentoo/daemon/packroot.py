"""pack-root: layers of host directories merged into a reproducible newc initramfs.

Inputs are an ordered list of layers (the root, config/common, then the
hardware and secret-sauce overlays); later layers win per path. Nothing is
staged or modified: each layer is walked through directory fds with
O_NOFOLLOW, never leaving the layer nor the layer's filesystem, and file
contents are spliced from fds opened relative to their parent directory.

Decisions (the rules the archive follows):

- Merge: a non-directory in a later layer replaces the same path below it,
  whatever its type. A directory replaced by a non-directory (a file or a
  symlink, e.g. lib64 -> lib) takes its whole subtree from earlier layers with
  it. Directories merge, and the later layer's directory metadata (mode,
  owner) wins, as the old `cp -a overlay/. staging/` did: keep overlay
  directories owned by root. There are no whiteouts.
- Exclusions are globs on the path relative to each layer root, applied to
  every layer. `*`, `?` and `[...]` never match '/', so `var/cache/*` drops
  what is inside var/cache and keeps the directory itself. Patterns are read
  in order and the last one that matches decides; `!pattern` re-includes
  (`!var/cache/ldconfig` after `var/cache/*`). Excluded directories are not
  walked at all (var/db/repos can hold hundreds of thousands of files).
- Other filesystems: a directory on another device (a mounted /proc, a
  bind-mounted distfiles) is kept, empty.
- Sockets are skipped (an initramfs cannot use one; a warning lists them).
  fifos, character and block devices are kept. Hardlinks are kept for regular
  files; other hardlinked types are archived as independent entries.
- Always present: dev (with console c 5:1 0600 and null c 1:3 0666), proc,
  sys, tmp, run. They are a base below the root, so the root's own
  directories win. /dev/console must exist or the kernel cannot open an
  initial console.
- Order: depth first, each directory's entries sorted by name bytes (so
  parents come before children and a subtree is contiguous, which keeps one
  open directory fd per level while writing). Paths are relative, no "./",
  no "." entry. mtimes are min(mtime, epoch); inodes are numbered 1.. in
  archive order; a directory's nlink is 2 + its archived subdirectories.

Layered form: member k holds layer k's own entries that survive the merge
(member 0 also the base entries). The kernel unpacks members in order; since
every non-directory path is in exactly one member, and a directory's later
chown/chmod win, the result equals the single archive. A member's
fingerprint covers its layer's stat walk, the options, and the paths that
later layers take away from it, so editing a file in an overlay repacks that
overlay's member only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from fnmatch import translate
from pathlib import Path

from autogentoo.daemon import faults
from autogentoo.daemon.cpio import DataChanged, NewcWriter
from autogentoo.daemon.run import BASE_ENV, ENOSPC_MARKERS, describe_status
from autogentoo.errors import (
    CommandFailed,
    Conflict,
    InvalidArgument,
    NoSpace,
    NotFound,
    UnsafePath,
)

log = logging.getLogger(__name__)

# Bump when the archive layout changes, so old cached members are not reused.
FORMAT_VERSION = "packroot-1"

DEFAULT_EXCLUDES: tuple[str, ...] = (
    "var/tmp/portage/*",
    "var/cache/distfiles/*",
    "var/cache/binpkgs/*",
    "var/cache/*",
    "var/db/repos/*",
    "var/db/pkg/*",
    "usr/portage/*",
    "usr/src/*",
    "usr/share/doc/*",
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/gtk-doc/*",
    "var/log/*",
    "proc/*",
    "sys/*",
    "dev/*",
    "tmp/*",
    "run/*",
)


class Compression(StrEnum):
    GZIP = "gzip"
    ZSTD = "zstd"
    XZ = "xz"
    LZ4 = "lz4"
    NONE = "none"

    @property
    def suffix(self) -> str:
        return {"gzip": ".gz", "zstd": ".zst", "xz": ".xz", "lz4": ".lz4", "none": ""}[self.value]


# zstd -9: levels from 13 up cost ten times the time (200 s against ~15 s for
# 300 MB on 2 cores) for a few percent. lz4 must be the legacy frame format and xz
# must use crc32, or the kernel's decompressors refuse them.
DEFAULT_LEVEL: dict[Compression, int] = {
    Compression.GZIP: 9,
    Compression.ZSTD: 9,
    Compression.XZ: 6,
    Compression.LZ4: 9,
}
LEVEL_RANGE: dict[Compression, tuple[int, int]] = {
    Compression.GZIP: (1, 9),
    Compression.ZSTD: (1, 19),
    Compression.XZ: (0, 9),
    Compression.LZ4: (1, 12),
}


def compressor_argv(compress: Compression, level: int | None) -> tuple[str, ...] | None:
    """The command that compresses stdin to stdout reproducibly (None: store)."""
    if compress is Compression.NONE:
        if level is not None:
            raise InvalidArgument("--level makes no sense with --compress none")
        return None
    lo, hi = LEVEL_RANGE[compress]
    lvl = DEFAULT_LEVEL[compress] if level is None else level
    if isinstance(lvl, bool) or not isinstance(lvl, int) or not lo <= lvl <= hi:
        raise InvalidArgument(
            f"compression level {level!r} is not valid for {compress}: use {lo} to {hi}"
        )
    if compress is Compression.GZIP:
        # -n -T: no name and no timestamp in the header, so same bytes each time.
        return ("pigz", "-n", "-T", f"-{lvl}", "-c")
    if compress is Compression.ZSTD:
        # Multi-threaded zstd output does not depend on the thread count.
        return ("zstd", "-q", f"-{lvl}", "-T0", "-c")
    if compress is Compression.XZ:
        return ("xz", "-q", f"-{lvl}", "--check=crc32", "-T0", "-c")
    return ("lz4", "-q", "-l", f"-{lvl}", "-c")


@dataclass(frozen=True)
class Layer:
    name: str
    path: Path


@dataclass(frozen=True)
class PackOptions:
    # SOURCE_DATE_EPOCH: every mtime above it is clamped down to it.
    epoch: int
    compress: Compression = Compression.GZIP
    level: int | None = None
    excludes: tuple[str, ...] = DEFAULT_EXCLUDES

    def key(self) -> str:
        return json.dumps(
            [FORMAT_VERSION, str(self.compress), self.level, self.epoch, list(self.excludes)]
        )


@dataclass(frozen=True)
class PackResult:
    path: Path
    size: int
    sha256: str
    entries: int
    warnings: tuple[str, ...]
    fingerprint: str
    # True when the artefact came from the cache (pack_layers only).
    cached: bool = False


@dataclass(frozen=True)
class LayeredResult:
    """One compressed member per layer, and their concatenation (when asked for).

    Without the concatenation, path is None and sha256 empty: serve the
    members' files one after the other.
    """

    path: Path | None
    size: int
    sha256: str
    fingerprint: str
    members: tuple[PackResult, ...]
    warnings: tuple[str, ...]
    cached: bool


# --- exclusions ---------------------------------------------------------------


@dataclass(frozen=True)
class _Pattern:
    segs: tuple[re.Pattern[str], ...]
    negate: bool


def _compile_excludes(patterns: Iterable[str]) -> tuple[_Pattern, ...]:
    out = []
    for raw in patterns:
        negate = raw.startswith("!")
        body = raw[1:] if negate else raw
        parts = [p for p in body.strip("/").split("/") if p not in ("", ".")]
        if not parts or ".." in parts or "**" in body:
            raise InvalidArgument(
                f"exclude pattern {raw!r} is not valid: use a relative glob like 'var/cache/*'"
                " ('*' does not cross '/', no '**' or '..')"
            )
        # fnmatch's '*' would cross '/', but we match one component at a time.
        out.append(_Pattern(tuple(re.compile(translate(p)) for p in parts), negate))
    return tuple(out)


# --- scanning a layer -----------------------------------------------------------


class Node:
    """One entry of a layer, from lstat; dirs carry their children."""

    __slots__ = (
        "children",
        "ctime_ns",
        "dev",
        "gid",
        "ino",
        "mode",
        "mtime_ns",
        "name",
        "nlink",
        "rdev",
        "size",
        "target",
        "uid",
    )

    def __init__(self, name: bytes, st: os.stat_result, target: bytes | None = None) -> None:
        self.name = name
        self.mode = st.st_mode
        self.uid = st.st_uid
        self.gid = st.st_gid
        self.size = st.st_size
        self.mtime_ns = st.st_mtime_ns
        self.ctime_ns = st.st_ctime_ns
        self.ino = st.st_ino
        self.dev = st.st_dev
        self.nlink = st.st_nlink
        self.rdev = st.st_rdev
        self.target = target
        self.children: dict[bytes, Node] | None = {} if stat.S_ISDIR(st.st_mode) else None


@dataclass
class _Scan:
    layer: Layer
    root: Node
    fingerprint: str
    sockets: list[bytes] = field(default_factory=list)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_layer(layer: Layer) -> int:
    try:
        return os.open(layer.path, _DIR_FLAGS)
    except FileNotFoundError:
        raise NotFound(
            f"layer {layer.name!r}: {layer.path} does not exist", layer=layer.name
        ) from None
    except NotADirectoryError:
        raise NotFound(
            f"layer {layer.name!r}: {layer.path} is not a directory", layer=layer.name
        ) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePath(
                f"layer {layer.name!r}: {layer.path} is a symlink; name the real directory",
                layer=layer.name,
            ) from None
        raise


def _scan(layer: Layer, opts: PackOptions, patterns: tuple[_Pattern, ...]) -> _Scan:
    """Walk one layer by dir fds, lstat only; hash what the archive depends on."""
    h = hashlib.sha256()
    h.update(opts.key().encode())
    root_fd = _open_layer(layer)
    try:
        root = Node(b"", os.fstat(root_fd))
        sockets: list[bytes] = []
        root_dev = root.dev
        # Each frame: dir fd, its path prefix, its node, child dirs still to walk,
        # patterns still live below it. Open fds = depth.
        stack: list[tuple[int, bytes, list[Node], tuple[_Pattern, ...]]] = []
        pending = _scan_dir(root_fd, b"", root, patterns, root_dev, h, sockets)
        stack.append((root_fd, b"", pending, patterns))
        while stack:
            fd, prefix, todo, live = stack[-1]
            if not todo:
                stack.pop()
                if fd != root_fd:
                    os.close(fd)
                continue
            child = todo.pop()
            depth = prefix.count(b"/")
            name_s = os.fsdecode(child.name)
            child_live = tuple(
                p for p in live if len(p.segs) > depth + 1 and p.segs[depth].match(name_s)
            )
            try:
                cfd = os.open(child.name, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                raise Conflict(
                    f"layer {layer.name!r}: cannot open {os.fsdecode(prefix + child.name)!r}"
                    f" ({e.strerror}); was it changed while packing?"
                ) from None
            cprefix = prefix + child.name + b"/"
            try:
                sub = _scan_dir(cfd, cprefix, child, child_live, root_dev, h, sockets)
            except BaseException:
                os.close(cfd)
                raise
            stack.append((cfd, cprefix, sub, child_live))
    except BaseException:
        for fd, *_ in stack:
            if fd != root_fd:
                os.close(fd)
        raise
    finally:
        os.close(root_fd)
    return _Scan(layer, root, h.hexdigest(), sockets)


def _scan_dir(
    fd: int,
    prefix: bytes,
    node: Node,
    live: tuple[_Pattern, ...],
    root_dev: int,
    h: hashlib._Hash,
    sockets: list[bytes],
) -> list[Node]:
    """Fill node.children from the open dir fd; return the subdirs to walk."""
    depth = prefix.count(b"/")
    leaf = [p for p in live if len(p.segs) == depth + 1]
    children = node.children
    assert children is not None
    subdirs: list[Node] = []
    records: list[bytes] = [b"D", prefix, b"\0"]
    with os.scandir(fd) as it:
        items = sorted((os.fsencode(e.name), e) for e in it)
    for name, entry in items:
        if leaf:
            excluded = False
            for p in leaf:
                if p.segs[depth].match(entry.name):
                    excluded = not p.negate
            if excluded:
                continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # gone since readdir
        mode = st.st_mode
        target = None
        if stat.S_ISLNK(mode):
            target = os.readlink(name, dir_fd=fd)
        elif stat.S_ISSOCK(mode):
            sockets.append(prefix + name)
            continue
        n = Node(name, st, target)
        children[name] = n
        mount = stat.S_ISDIR(mode) and st.st_dev != root_dev
        if stat.S_ISDIR(mode) and not mount:
            subdirs.append(n)
        records.append(
            b"%s\0%o %d %d %d %d %d %d %d %d %d\0%s\n"
            % (
                name,
                mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
                st.st_ino,
                st.st_nlink,
                st.st_rdev,
                mount,
                target or b"",
            )
        )
    h.update(b"".join(records))
    # Walked in reverse pop order, i.e. sorted: the hash order is stable.
    subdirs.reverse()
    return subdirs


def fingerprint(layer: Layer, opts: PackOptions) -> str:
    """A cheap stat-based digest of one layer (no content read) and the options."""
    return _scan(layer, opts, _compile_excludes(opts.excludes)).fingerprint


# --- merging --------------------------------------------------------------------

# Internal layer numbers: 0 is the base (dev, proc...), k+1 is layers[k].


class _M:
    """A merged path: its winner, and for dirs every layer's own node."""

    __slots__ = ("children", "layer", "node", "own", "subtree")

    def __init__(self, layer: int, node: Node) -> None:
        self.layer = layer
        self.node = node
        self.children: dict[bytes, _M] | None = None
        # dirs: (layer, node) for each layer that has this dir, in order
        self.own: list[tuple[int, Node]] = []
        # bitmask of the layers with an entry here or below
        self.subtree = 1 << layer


def _base(epoch: int) -> Node:
    def st(mode: int, rdev: int = 0) -> os.stat_result:
        return os.stat_result((mode, 0, 0, 1, 0, 0, 0, epoch, epoch, epoch))

    def node(name: bytes, mode: int, rdev: int = 0) -> Node:
        n = Node(name, st(mode))
        n.rdev = rdev
        n.mtime_ns = n.ctime_ns = epoch * 1_000_000_000
        return n

    root = node(b"", stat.S_IFDIR | 0o755)
    dev = node(b"dev", stat.S_IFDIR | 0o755)
    assert dev.children is not None and root.children is not None
    dev.children[b"console"] = node(b"console", stat.S_IFCHR | 0o600, os.makedev(5, 1))
    dev.children[b"null"] = node(b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    root.children[b"dev"] = dev
    for name, mode in ((b"proc", 0o555), (b"sys", 0o555), (b"run", 0o755), (b"tmp", 0o1777)):
        root.children[name] = node(name, stat.S_IFDIR | mode)
    return root


def _adopt(layer: int, node: Node) -> _M:
    m = _M(layer, node)
    if node.children is not None:
        m.own.append((layer, node))
        m.children = {name: _adopt(layer, c) for name, c in node.children.items()}
    return m


def _merge(trees: Sequence[Node]) -> tuple[_M, list[list[bytes]]]:
    """Merge layer trees (internal numbering); also say what each layer lost."""
    top = _adopt(0, trees[0])
    drops: list[list[bytes]] = [[] for _ in trees]
    for layer in range(1, len(trees)):
        bit = 1 << layer
        top.subtree |= bit
        top.own.append((layer, trees[layer]))
        stack: list[tuple[_M, Node, bytes]] = [(top, trees[layer], b"")]
        while stack:
            mdir, ldir, prefix = stack.pop()
            assert mdir.children is not None and ldir.children is not None
            for name, lnode in ldir.children.items():
                path = prefix + name
                old = mdir.children.get(name)
                if old is not None and lnode.children is not None and old.children is not None:
                    old.layer, old.node = layer, lnode
                    old.own.append((layer, lnode))
                    old.subtree |= bit
                    stack.append((old, lnode, path + b"/"))
                    continue
                if old is not None:
                    for i in range(len(trees)):
                        if old.subtree >> i & 1:
                            drops[i].append(path)
                mdir.children[name] = _adopt(layer, lnode)
    return top, drops


@dataclass(frozen=True)
class _Rec:
    path: bytes
    node: Node
    layer: int
    nlink: list[int]  # mutable cell: dirs get 2 + archived subdirs


def _flatten(top: _M, want: int) -> list[_Rec]:
    """Archive order for the layers in the `want` bitmask: DFS, names sorted."""
    out: list[_Rec] = []
    assert top.children is not None
    stack = [(b"", iter(sorted(top.children.items())), [0])]
    while stack:
        prefix, it, parent_nlink = stack[-1]
        for name, m in it:
            path = prefix + name
            if m.children is not None:
                own = [n for i, n in m.own if want >> i & 1]
                if not own:
                    continue
                layer = max(i for i, _ in m.own if want >> i & 1)
                rec = _Rec(path, own[-1], layer, [2])
                out.append(rec)
                parent_nlink[0] += 1
                if m.subtree & want:
                    stack.append((path + b"/", iter(sorted(m.children.items())), rec.nlink))
                    break
            elif want >> m.layer & 1:
                out.append(_Rec(path, m.node, m.layer, [1]))
        else:
            stack.pop()
    return out


# --- the plan ---------------------------------------------------------------------


@dataclass(frozen=True)
class PackPlan:
    """Everything known before writing: the merged tree and the fingerprints."""

    layers: tuple[Layer, ...]
    opts: PackOptions
    layer_fingerprints: tuple[str, ...]
    member_fingerprints: tuple[str, ...]
    # of the single-archive form
    fingerprint: str
    # of the concatenated layered form
    layered_fingerprint: str
    warnings: tuple[str, ...]
    _top: _M = field(repr=False, compare=False)


class ScanCache:
    """Walks of layers that change only through their owner, kept under a token.

    Walking a large root costs about half a second per 30,000 files; the
    daemon knows when a root changes (only its own jobs write roots), so it
    hands a token per root generation and a cache hit skips the walk.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._scans: dict[tuple[str, str, str], _Scan] = {}
        # Packs run in worker threads; two may share a root (shared lock).
        self._lock = threading.Lock()

    def get(
        self, layer: Layer, opts: PackOptions, token: str, patterns: tuple[_Pattern, ...]
    ) -> _Scan:
        key = (str(layer.path), token, opts.key())
        with self._lock:
            scan = self._scans.get(key)
        if scan is None:
            scan = _scan(layer, opts, patterns)
        with self._lock:
            self._scans.pop(key, None)
            self._scans[key] = scan  # most recently used last
            while len(self._scans) > self.size:
                del self._scans[next(iter(self._scans))]
        return scan


def plan(
    layers: Sequence[Layer],
    opts: PackOptions,
    *,
    cache: ScanCache | None = None,
    tokens: Mapping[str, str] | None = None,
) -> PackPlan:
    """Scan every layer (stat only) and merge them; no content is read.

    With a cache, a layer whose name has a token in `tokens` is walked only
    the first time that token is seen.
    """
    if not layers:
        raise InvalidArgument("pack-root needs at least one layer (the root)")
    compressor_argv(opts.compress, opts.level)  # validate early
    patterns = _compile_excludes(opts.excludes)
    tokens = tokens or {}
    scans = [
        cache.get(layer, opts, tokens[layer.name], patterns)
        if cache is not None and layer.name in tokens
        else _scan(layer, opts, patterns)
        for layer in layers
    ]
    top, drops = _merge([_base(opts.epoch)] + [s.root for s in scans])
    members = []
    for k, scan in enumerate(scans):
        h = hashlib.sha256(b"member\0%d\0" % (k == 0))
        h.update(scan.fingerprint.encode())
        for i in (0, k + 1) if k == 0 else (k + 1,):
            h.update(b"\0drops %d\0" % i + b"\0".join(sorted(drops[i])))
        members.append(h.hexdigest())
    warnings = []
    init = top.children.get(b"init") if top.children is not None else None
    if init is None or not (stat.S_ISREG(init.node.mode) or stat.S_ISLNK(init.node.mode)):
        warnings.append(
            "there is no /init in the archive, so the kernel will not find a program to"
            " start: add /init (a file or a symlink, e.g. to /sbin/init or"
            " /lib/systemd/systemd) in the root or an overlay, or set rdinit= on the"
            " kernel command line"
        )
    for scan in scans:
        if scan.sockets:
            shown = ", ".join(repr(os.fsdecode(p)) for p in scan.sockets[:5])
            more = f" and {len(scan.sockets) - 5} more" if len(scan.sockets) > 5 else ""
            warnings.append(
                f"layer {scan.layer.name!r}: skipped {len(scan.sockets)} socket(s), which an"
                f" initramfs cannot use: {shown}{more}"
            )
    fps = tuple(s.fingerprint for s in scans)
    return PackPlan(
        layers=tuple(layers),
        opts=opts,
        layer_fingerprints=fps,
        member_fingerprints=tuple(members),
        fingerprint=hashlib.sha256(("single\0" + "\0".join(fps)).encode()).hexdigest(),
        layered_fingerprint=hashlib.sha256(("layered\0" + "\0".join(members)).encode()).hexdigest(),
        warnings=tuple(warnings),
        _top=top,
    )


# --- writing ----------------------------------------------------------------------


class _DirFds:
    """Open directory fds along the current path of one layer (DFS order keeps it short)."""

    def __init__(self, layer: Layer) -> None:
        self.layer = layer
        self.root = _open_layer(layer)
        self.names: list[bytes] = []
        self.fds: list[int] = []

    def get(self, parts: Sequence[bytes]) -> int:
        keep = 0
        while keep < len(self.names) and keep < len(parts) and self.names[keep] == parts[keep]:
            keep += 1
        while len(self.names) > keep:
            self.names.pop()
            os.close(self.fds.pop())
        for name in parts[keep:]:
            parent = self.fds[-1] if self.fds else self.root
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            except OSError as e:
                raise _changed(self.layer, b"/".join(parts), e) from None
            self.names.append(name)
            self.fds.append(fd)
        return self.fds[-1] if self.fds else self.root

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        self.names.clear()
        os.close(self.root)


def _changed(layer: Layer, path: bytes, e: OSError | None = None) -> Conflict:
    why = f" ({e.strerror})" if e is not None else ""
    return Conflict(
        f"layer {layer.name!r}: {os.fsdecode(path)!r} changed while packing{why};"
        " pack again once the root is idle",
        layer=layer.name,
    )


def _write_archive(p: PackPlan, want: int, out_fd: int) -> int:
    """Write the newc archive of the wanted layers to out_fd; return the entry count."""
    recs = _flatten(p._top, want)
    epoch = p.opts.epoch
    groups: dict[tuple[int, int, int], int] = {}
    for r in recs:
        if r.node.nlink > 1 and stat.S_ISREG(r.node.mode):
            key = (r.layer, r.node.dev, r.node.ino)
            groups[key] = groups.get(key, 0) + 1
    seen: dict[tuple[int, int, int], tuple[int, int]] = {}  # key -> (ino, count so far)
    dirfds: dict[int, _DirFds] = {}
    writer = NewcWriter(out_fd)
    ino = 0
    try:
        for r in recs:
            n = r.node
            mode = n.mode
            mtime = min(n.mtime_ns // 1_000_000_000, epoch)
            if stat.S_ISREG(mode):
                key = (r.layer, n.dev, n.ino)
                count = groups.get(key, 1)
                if count > 1:
                    first_ino, done = seen.get(key, (0, 0))
                    if not first_ino:
                        ino += 1
                        first_ino = ino
                    seen[key] = (first_ino, done + 1)
                    this_ino, last = first_ino, done + 1 == count
                else:
                    ino += 1
                    this_ino, last = ino, True
                if not last or n.size == 0:
                    writer.add_file(
                        r.path,
                        ino=this_ino,
                        mode=mode,
                        uid=n.uid,
                        gid=n.gid,
                        nlink=count,
                        mtime=mtime,
                        size=0,
                        src_fd=None,
                    )
                    continue
                layer = p.layers[r.layer - 1]
                fds = dirfds.get(r.layer)
                if fds is None:
                    fds = dirfds[r.layer] = _DirFds(layer)
                parts = r.path.split(b"/")
                parent = fds.get(parts[:-1])
                try:
                    src = os.open(
                        parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent
                    )
                except OSError as e:
                    raise _changed(layer, r.path, e) from None
                try:
                    st = os.fstat(src)
                    if st.st_ino != n.ino or not stat.S_ISREG(st.st_mode):
                        raise _changed(layer, r.path)
                    writer.add_file(
                        r.path,
                        ino=this_ino,
                        mode=mode,
                        uid=n.uid,
                        gid=n.gid,
                        nlink=count,
                        mtime=mtime,
                        size=n.size,
                        src_fd=src,
                    )
                except DataChanged:
                    raise _changed(layer, r.path) from None
                finally:
                    os.close(src)
                continue
            ino += 1
            if stat.S_ISLNK(mode):
                writer.add(
                    r.path,
                    ino=ino,
                    mode=mode,
                    uid=n.uid,
                    gid=n.gid,
                    mtime=mtime,
                    data=n.target or b"",
                )
            elif stat.S_ISDIR(mode):
                writer.add(
                    r.path, ino=ino, mode=mode, uid=n.uid, gid=n.gid, nlink=r.nlink[0], mtime=mtime
                )
            else:  # fifo, chr, blk
                rdev = n.rdev if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0
                writer.add(r.path, ino=ino, mode=mode, uid=n.uid, gid=n.gid, mtime=mtime, rdev=rdev)
        writer.finish()
    finally:
        for fds in dirfds.values():
            fds.close()
    return writer.entries


def _is_enospc(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _compressed_to(
    dest: Path, argv: tuple[str, ...] | None, produce: Callable[[int], int]
) -> tuple[int, str, int]:
    """Run produce(fd) into the compressor and the result into dest, atomically.

    Returns (size, sha256, produce's result). The output goes to a temp file
    in dest's directory, fsync'd and renamed on success, removed on any error.
    """
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        try:
            result = produce(fd) if argv is None else _through(argv, fd, produce)
            os.fsync(fd)
            size = os.fstat(fd).st_size
            os.lseek(fd, 0, os.SEEK_SET)
            with os.fdopen(os.dup(fd), "rb") as f:
                sha = hashlib.file_digest(f, "sha256").hexdigest()
            os.fchmod(fd, 0o644)
            os.rename(tmp, dest)
        except OSError as e:
            if _is_enospc(e):
                raise NoSpace(
                    f"no space left for {dest} in {dest.parent}: free some space and pack again",
                    path=str(dest),
                ) from None
            raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    dfd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return size, sha, result


def _through(argv: tuple[str, ...], out_fd: int, produce: Callable[[int], int]) -> int:
    """produce(pipe) -> argv -> out_fd; the child is always reaped, its stderr kept."""
    log.debug("+ %s", shlex.join(argv))
    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        # A bigger pipe means fewer wakeups between us and the compressor.
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
    with tempfile.TemporaryFile() as errf:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=r,
                stdout=out_fd,
                stderr=errf,
                env=dict(BASE_ENV),
                start_new_session=True,
            )
        except BaseException:
            os.close(r)
            os.close(w)
            raise
        os.close(r)
        try:
            try:
                result = produce(w)
            except BrokenPipeError:
                result = -1
            finally:
                os.close(w)
            rc = proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
            raise
        if rc != 0 or result < 0:
            errf.seek(0)
            tail = errf.read().decode("utf-8", "replace").strip().splitlines()[-5:]
            msg = f"{shlex.join(argv)} {describe_status(rc)}"
            if tail:
                msg += ": " + " / ".join(tail)
            if any(m in line for line in tail for m in ENOSPC_MARKERS):
                raise NoSpace(msg + ": free some space and pack again", command=argv[0])
            raise CommandFailed(msg, command=argv[0], returncode=rc)
    return result


def _pack(p: PackPlan, want: int, dest: Path, fp: str) -> PackResult:
    argv = compressor_argv(p.opts.compress, p.opts.level)
    size, sha, entries = _compressed_to(dest, argv, lambda fd: _write_archive(p, want, fd))
    return PackResult(Path(dest), size, sha, entries, p.warnings, fp)


def pack_single(
    layers: Sequence[Layer], opts: PackOptions, dest: Path, *, plan_: PackPlan | None = None
) -> PackResult:
    """One archive of the merged layers (the kernel-embedded form). Blocking."""
    p = plan_ or plan(layers, opts)
    return _pack(p, (1 << (len(p.layers) + 1)) - 1, dest, p.fingerprint)


def pack_member(
    layer_index: int,
    layers: Sequence[Layer],
    opts: PackOptions,
    dest: Path,
    *,
    plan_: PackPlan | None = None,
) -> PackResult:
    """The compressed member of layers[layer_index] (member 0 adds dev, proc...)."""
    p = plan_ or plan(layers, opts)
    if not 0 <= layer_index < len(p.layers):
        raise InvalidArgument(f"layer index {layer_index} out of range 0..{len(p.layers) - 1}")
    want = 0b11 if layer_index == 0 else 1 << (layer_index + 1)
    return _pack(p, want, dest, p.member_fingerprints[layer_index])


# --- a member cache -----------------------------------------------------------------


def _cached(cache_dir: Path, fp: str, suffix: str) -> tuple[Path, dict[str, int | str]] | None:
    path = cache_dir / f"{fp}.cpio{suffix}"
    meta = cache_dir / f"{fp}.json"
    try:
        info = json.loads(meta.read_text())
        if path.stat().st_size != info["size"]:
            return None
    except (OSError, ValueError, KeyError):
        return None
    return path, info


def _from_cache(path: Path, info: dict[str, int | str], fp: str, p: PackPlan) -> PackResult:
    return PackResult(
        path, int(info["size"]), str(info["sha256"]), int(info["entries"]), p.warnings, fp, True
    )


def _remember(cache_dir: Path, r: PackResult) -> None:
    meta = cache_dir / f"{r.fingerprint}.json"
    fd, tmp = tempfile.mkstemp(prefix=f".{meta.name}.", dir=cache_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"size": r.size, "sha256": r.sha256, "entries": r.entries}, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, meta)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def pack_layers(
    layers: Sequence[Layer],
    opts: PackOptions,
    cache_dir: Path,
    *,
    concatenate: bool = True,
    plan_: PackPlan | None = None,
) -> LayeredResult:
    """One cached compressed member per layer, concatenated into one initramfs.

    Members and the concatenation live in cache_dir under their fingerprints;
    only members whose fingerprint changed are packed again.
    """
    p = plan_ or plan(layers, opts)
    suffix = p.opts.compress.suffix
    cache_dir = Path(cache_dir)
    cached_members = [_cached(cache_dir, fp, suffix) for fp in p.member_fingerprints]
    whole = _cached(cache_dir, p.layered_fingerprint, suffix) if concatenate else None
    if whole is not None:
        path, info = whole
        # Members are informational here; one pruned from the cache is no error.
        hits = tuple(
            _from_cache(path_, info_, fp, p)
            for hit, fp in zip(cached_members, p.member_fingerprints, strict=True)
            if hit is not None
            for path_, info_ in (hit,)
        )
        return LayeredResult(
            path,
            int(info["size"]),
            str(info["sha256"]),
            p.layered_fingerprint,
            hits if len(hits) == len(p.layers) else (),
            p.warnings,
            True,
        )
    members: list[PackResult] = []
    for k, (hit, fp) in enumerate(zip(cached_members, p.member_fingerprints, strict=True)):
        if hit is not None:
            members.append(_from_cache(hit[0], hit[1], fp, p))
        else:
            r = pack_member(k, p.layers, p.opts, cache_dir / f"{fp}.cpio{suffix}", plan_=p)
            _remember(cache_dir, r)
            faults.point_sync("pack.member_written")
            members.append(r)
    if not concatenate:
        return LayeredResult(
            None,
            sum(m.size for m in members),
            "",
            p.layered_fingerprint,
            tuple(members),
            p.warnings,
            all(m.cached for m in members),
        )

    def concat(out_fd: int) -> int:
        for m in members:
            src = os.open(m.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                left = m.size
                while left:
                    n = os.copy_file_range(src, out_fd, left)
                    if n == 0:
                        raise _changed(Layer("cache", cache_dir), os.fsencode(m.path))
                    left -= n
            finally:
                os.close(src)
        return 0

    dest = cache_dir / f"{p.layered_fingerprint}.cpio{suffix}"
    size, sha, _ = _compressed_to(dest, None, concat)
    entries = sum(m.entries for m in members)
    result = PackResult(dest, size, sha, entries, p.warnings, p.layered_fingerprint)
    _remember(cache_dir, result)
    return LayeredResult(dest, size, sha, p.layered_fingerprint, tuple(members), p.warnings, False)


__all__ = [
    "DEFAULT_EXCLUDES",
    "Compression",
    "Layer",
    "LayeredResult",
    "PackOptions",
    "PackPlan",
    "PackResult",
    "ScanCache",
    "compressor_argv",
    "fingerprint",
    "pack_layers",
    "pack_member",
    "pack_single",
    "plan",
]
