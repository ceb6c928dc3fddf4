"""Inputs fetched from upstream, verified, kept and recorded.

- *stage3 cache*: `agctl stage3 fetch PROFILE` reads the mirror's signed
  `latest-stage3-PROFILE.txt`, the tarball's clearsigned `.DIGESTS` and its
  detached `.asc`, and keeps the tarball under its SHA-512 digest.
- *repository snapshots*: the signed `snapshots/gentoo-latest.tar.xz`,
  extracted with the stage3 rules (archive.py) and made into a read-only
  squashfs image that jobs loop-mount at /var/db/repos/gentoo. A few are
  kept by name; one is in use.
- *kernel sources*: a kernel.org-shaped `vN.x/linux-V.tar.xz` checked
  against the signed `sha256sums.asc`, kept in the cache and unpacked into
  the kernel source directory for pack-kernel.

Everything is downloaded into the daemon's scratch directory and moved into
the cache only once every check passed: a bad signature, a digest mismatch,
an unknown profile or an unreachable mirror leaves no file in the cache.
Each record says where the file came from (URL), its digest, the key that
signed it and when it was fetched.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autogentoo.daemon import archive, digests, signatures
from autogentoo.daemon import state as st
from autogentoo.daemon.run import run
from autogentoo.daemon.upstream import Mirrors, check_rel
from autogentoo.errors import (
    AlreadyExists,
    Conflict,
    DigestMismatch,
    InvalidArgument,
    NotFound,
)
from autogentoo.names import check_name

if TYPE_CHECKING:
    from autogentoo.daemon.jobs import JobContext
    from autogentoo.daemon.service import Daemon

# A latest-stage3-*.txt or a signature is small; refuse anything that is not.
SMALL = 1 << 20
REPO_IMAGE_SUFFIX = ".sqfs"
SNAPSHOT_REL = "snapshots/gentoo-latest.tar.xz"
SNAPSHOT_SIG_SUFFIX = ".gpgsig"

_PROFILE = re.compile(r"[a-z0-9][a-z0-9_+]*(-[a-z0-9_+]+)*")
_KERNEL_VERSION = re.compile(r"([1-9][0-9]?)\.[0-9]{1,3}(\.[0-9]{1,4})?(-rc[0-9]{1,2})?")
_PUBLISHED = re.compile(r"[0-9]{8}(T[0-9]{6}Z)?")
_SNAPSHOT_DIR = re.compile(r"gentoo-[0-9]{8}")

# The releases/ directory a profile's first word lives in, where it differs.
_ARCH_DIR = {
    "i486": "x86",
    "i686": "x86",
    "x86": "x86",
    "armv4tl": "arm",
    "armv5tel": "arm",
    "armv6j": "arm",
    "armv6j_hardfp": "arm",
    "armv7a": "arm",
    "armv7a_hardfp": "arm",
    "ppc64": "ppc",
    "ppc64le": "ppc",
    "power9le": "ppc",
    "s390x": "s390",
    "rv32": "riscv",
    "rv64": "riscv",
    "mips64el": "mips",
    "hppa1.1": "hppa",
    "hppa2.0": "hppa",
    "sparc64": "sparc",
    "loong": "loong",
}

_repo_lock: asyncio.Lock | None = None


def check_profile(untrusted: str) -> str:
    if not isinstance(untrusted, str) or len(untrusted) > 80 or not _PROFILE.fullmatch(untrusted):
        raise InvalidArgument(
            f"{str(untrusted)[:80]!r} is not a stage3 profile name like amd64-openrc"
            " or arm64-desktop-systemd",
            field="profile",
        )
    return untrusted


def arch_dir(profile: str) -> str:
    """The releases/<arch> directory of a profile (amd64-openrc -> amd64)."""
    first = profile.split("-", 1)[0]
    if first.startswith("rv64"):
        return "riscv"
    return _ARCH_DIR.get(first, first)


def check_kernel_version(untrusted: str) -> str:
    if not isinstance(untrusted, str) or not _KERNEL_VERSION.fullmatch(untrusted):
        raise InvalidArgument(
            f"{str(untrusted)[:40]!r} is not a kernel version like 6.1 or 6.6.30",
            field="version",
        )
    return untrusted


# --- where things live --------------------------------------------------------


@dataclass(frozen=True)
class Store:
    top: Path

    @classmethod
    def of(cls, daemon: Daemon) -> Store:
        store = cls(daemon.config.state_dir / "upstream")
        for d in (store.stage3s, store.repos, store.kernels):
            d.mkdir(parents=True, exist_ok=True, mode=0o755)
        return store

    @property
    def stage3s(self) -> Path:
        return self.top / "stage3"

    @property
    def repos(self) -> Path:
        return self.top / "repos"

    @property
    def kernels(self) -> Path:
        return self.top / "kernels"

    def stage3_path(self, digest: str, filename: str) -> Path:
        # By digest (the hex after "sha512:"), keeping the compression suffix.
        suffix = "".join(Path(filename).suffixes[-2:]) if ".tar" in filename else ""
        return self.stage3s / (digest.split(":", 1)[1] + suffix)

    def repo_image(self, name: str) -> Path:
        return self.repos / (name + REPO_IMAGE_SUFFIX)

    def kernel_tarball(self, filename: str) -> Path:
        return self.kernels / filename


@contextlib.contextmanager
def _scratch(daemon: Daemon, ctx: JobContext) -> Any:
    """A per-job scratch directory (the daemon clears them all at start)."""
    path = daemon.config.tmp_dir / f"upstream-{ctx.id}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _sha512(path: Path) -> str:
    h = hashlib.sha512()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(digests.CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return f"sha512:{h.hexdigest()}"


def _install(src: Path, dest: Path) -> None:
    """Move a verified file into the cache, atomically, readable by all."""
    os.chmod(src, 0o644)
    os.replace(src, dest)


# --- stage3 -------------------------------------------------------------------


@dataclass(frozen=True)
class LatestEntry:
    path: str  # relative to releases/<arch>/autobuilds
    size: int

    @property
    def published(self) -> str:
        return self.path.split("/", 1)[0]

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def parse_latest(text: str, profile: str) -> LatestEntry:
    """The tarball a signed latest-stage3-PROFILE.txt names: lines of '<path> <size>'."""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise InvalidArgument(f"latest-stage3-{profile}.txt: cannot read the line {line!r}")
        path = check_rel(parts[0])
        entry = LatestEntry(path, int(parts[1]))
        if (
            "/" not in path
            or not _PUBLISHED.fullmatch(entry.published)
            or not entry.filename.startswith(f"stage3-{profile}-")
        ):
            raise InvalidArgument(
                f"latest-stage3-{profile}.txt names {path!r}, which is not a stage3 of {profile}"
            )
        return entry
    raise InvalidArgument(f"latest-stage3-{profile}.txt names no tarball")


async def fetch_stage3(daemon: Daemon, ctx: JobContext, profile: str) -> None:
    """Job body: fetch, verify and keep the newest stage3 of profile."""
    cfg = daemon.config
    up = cfg.upstream
    store = Store.of(daemon)
    base = f"releases/{arch_dir(profile)}/autobuilds"
    log = ctx.log.line
    with _scratch(daemon, ctx) as tmp:
        async with Mirrors(up.mirrors) as mirrors:
            index_rel = f"{base}/latest-stage3-{profile}.txt"
            log(f"reading {index_rel}")
            try:
                await mirrors.fetch(index_rel, tmp / "latest.txt", max_bytes=SMALL)
            except NotFound:
                raise NotFound(
                    f"the mirror knows no stage3 profile {profile!r}"
                    f" (no {index_rel}); check the name against {base}/ on the mirror",
                    profile=profile,
                ) from None
            index = await signatures.verify_clearsigned(
                tmp / "latest.txt", up.keyring, tmp_dir=cfg.tmp_dir
            )
            entry = parse_latest(index.text.decode("utf-8", "replace"), profile)
            log(
                f"newest {profile}: {entry.path} ({entry.size} bytes),"
                f" index signed by {index.fingerprint}"
            )
            tar_rel = f"{base}/{entry.path}"

            await mirrors.fetch(tar_rel + ".DIGESTS", tmp / "DIGESTS", max_bytes=SMALL)
            signed = await signatures.verify_clearsigned(
                tmp / "DIGESTS", up.keyring, tmp_dir=cfg.tmp_dir
            )
            digests_text = signed.text.decode("utf-8", "replace")
            listed = digests.lookup(digests.parse_digests(digests_text), entry.filename)
            log(f"{entry.filename}.DIGESTS signed by {signed.fingerprint}")
            known = listed.get("sha512")
            if known is not None:
                row = daemon.state.one("SELECT * FROM stage3s WHERE digest=?", (f"sha512:{known}",))
                if row is not None and store.stage3_path(row["digest"], row["filename"]).is_file():
                    log(f"already in the stage3 cache: {entry.filename}")
                    ctx.result.update(_stage3_json(row))
                    return

            tarball = tmp / entry.filename
            log(f"downloading {tar_rel}")
            got = await mirrors.fetch(tar_rel, tarball, max_bytes=cfg.limits.max_upload, log=log)
            digest = await digests.verify(tarball, digests_text, filename=entry.filename)
            log(f"digest ok: {digest}")
            if got.size != entry.size:
                raise DigestMismatch(
                    f"{entry.filename} is {got.size} bytes, the signed index says {entry.size}",
                    filename=entry.filename,
                )
            with contextlib.suppress(NotFound):
                await mirrors.fetch(tar_rel + ".asc", tmp / "tarball.asc", max_bytes=SMALL)
            if (tmp / "tarball.asc").is_file():
                fpr = await signatures.verify_detached(
                    tarball, tmp / "tarball.asc", up.keyring, tmp_dir=cfg.tmp_dir
                )
                log(f"{entry.filename}.asc: good signature by {fpr}")

        _install(tarball, store.stage3_path(digest, entry.filename))
        daemon.state.execute(
            "INSERT OR REPLACE INTO stage3s"
            " (digest, profile, filename, published, url, signer, size, fetched)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (
                digest,
                profile,
                entry.filename,
                entry.published,
                got.url,
                signed.fingerprint,
                got.size,
                st.now(),
            ),
        )
    row = daemon.state.one("SELECT * FROM stage3s WHERE digest=?", (digest,))
    ctx.result.update(_stage3_json(row))
    log(f"stage3 {profile} {entry.published} kept in the cache")


def _stage3_json(row: Any) -> dict[str, Any]:
    return {
        "profile": row["profile"],
        "filename": row["filename"],
        "published": row["published"],
        "digest": row["digest"],
        "signer": row["signer"],
        "url": row["url"],
        "size": row["size"],
        "fetched": row["fetched"],
    }


def list_stage3s(daemon: Daemon) -> list[dict[str, Any]]:
    rows = daemon.state.all("SELECT * FROM stage3s ORDER BY profile, published DESC, fetched DESC")
    return [_stage3_json(r) for r in rows]


def newest_stage3(daemon: Daemon, profile: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest verified stage3 of profile still in the cache, or None."""
    store = Store.of(daemon)
    for row in daemon.state.all(
        "SELECT * FROM stage3s WHERE profile=? ORDER BY published DESC, fetched DESC", (profile,)
    ):
        path = store.stage3_path(row["digest"], row["filename"])
        if path.is_file():
            return path, _stage3_json(row)
    return None


# --- repository snapshots ------------------------------------------------------


def _lock() -> asyncio.Lock:
    global _repo_lock
    if _repo_lock is None:
        _repo_lock = asyncio.Lock()
    return _repo_lock


def _snapshot_name(top: Path, digest: str, taken: set[str]) -> str:
    # gentoo-latest.tar.xz holds one directory, gentoo-YYYYMMDD/
    name = top.name if _SNAPSHOT_DIR.fullmatch(top.name) else f"gentoo-{digest[7:19]}"
    if name in taken:
        name = f"{name}-{digest[7:15]}"
    return check_name(name, "snapshot name")


async def fetch_repo(daemon: Daemon, ctx: JobContext) -> None:
    """Job body: fetch the newest gentoo repository snapshot and keep it as squashfs."""
    cfg = daemon.config
    up = cfg.upstream
    store = Store.of(daemon)
    log = ctx.log.line
    async with _lock():
        with _scratch(daemon, ctx) as tmp:
            async with Mirrors(up.mirrors) as mirrors:
                tarball = tmp / "gentoo-latest.tar.xz"
                sig = tmp / "gentoo-latest.tar.xz.gpgsig"
                log(f"reading {SNAPSHOT_REL}{SNAPSHOT_SIG_SUFFIX}")
                await mirrors.fetch(SNAPSHOT_REL + SNAPSHOT_SIG_SUFFIX, sig, max_bytes=SMALL)
                log(f"downloading {SNAPSHOT_REL}")
                got = await mirrors.fetch(
                    SNAPSHOT_REL, tarball, max_bytes=cfg.limits.max_upload, log=log
                )
            fpr = await signatures.verify_detached(tarball, sig, up.keyring, tmp_dir=cfg.tmp_dir)
            log(f"good signature by {fpr}")
            digest = await asyncio.to_thread(_sha512, tarball)
            row = daemon.state.one("SELECT * FROM repo_snapshots WHERE digest=?", (digest,))
            if row is not None and store.repo_image(row["name"]).is_file():
                log(f"already kept as snapshot {row['name']}")
                ctx.result.update(_repo_json(row))
                return
            tree = tmp / "tree"
            tree.mkdir()
            try:
                log("checking and extracting the snapshot")
                await archive.extract_stage3(tarball, tree, max_bytes=cfg.limits.max_root_bytes)
                entries = list(tree.iterdir())
                top = entries[0] if len(entries) == 1 and entries[0].is_dir() else tree
                if top.is_symlink():
                    top = tree
                taken = {r["name"] for r in daemon.state.all("SELECT name FROM repo_snapshots")}
                name = _snapshot_name(top, digest, taken)
                image = tmp / "image.sqfs"
                log(f"making squashfs image {name}")
                await run(
                    [
                        "mksquashfs",
                        str(top),
                        str(image),
                        "-noappend",
                        "-no-progress",
                        "-no-xattrs",
                        "-quiet",
                    ]
                )
            finally:
                await archive.remove_tree(tree)
            image_size = image.stat().st_size
            _install(image, store.repo_image(name))
            with daemon.state.transaction() as db:
                first = db.execute("SELECT 1 FROM repo_snapshots WHERE active=1").fetchone() is None
                db.execute(
                    "INSERT INTO repo_snapshots"
                    " (name, digest, url, signer, size, image_size, fetched, active)"
                    " VALUES (?,?,?,?,?,?,?,?)",
                    (name, digest, got.url, fpr, got.size, image_size, st.now(), int(first)),
                )
        row = daemon.state.one("SELECT * FROM repo_snapshots WHERE name=?", (name,))
        ctx.result.update(_repo_json(row))
        log(f"snapshot {name} kept" + (" and in use" if first else f"; `agctl repo use {name}`"))
        for old in _prune(daemon, store):
            log(f"deleted old snapshot {old}")


def _prune(daemon: Daemon, store: Store) -> list[str]:
    keep = daemon.config.upstream.keep_repo_snapshots
    rows = daemon.state.all("SELECT name FROM repo_snapshots WHERE active=0 ORDER BY fetched DESC")
    removed = []
    for row in rows[keep:]:
        _forget_repo(daemon, store, row["name"])
        removed.append(row["name"])
    return removed


def _forget_repo(daemon: Daemon, store: Store, name: str) -> None:
    # Jobs that have it mounted keep the inode through their loop device.
    daemon.state.execute("DELETE FROM repo_snapshots WHERE name=?", (name,))
    with contextlib.suppress(FileNotFoundError):
        store.repo_image(name).unlink()


def _repo_json(row: Any) -> dict[str, Any]:
    return {
        "name": row["name"],
        "digest": row["digest"],
        "signer": row["signer"],
        "url": row["url"],
        "size": row["size"],
        "image_size": row["image_size"],
        "fetched": row["fetched"],
        "active": bool(row["active"]),
    }


def list_repos(daemon: Daemon) -> list[dict[str, Any]]:
    return [
        _repo_json(r)
        for r in daemon.state.all("SELECT * FROM repo_snapshots ORDER BY fetched DESC")
    ]


def _repo_row(daemon: Daemon, name: str) -> Any:
    row = daemon.state.one("SELECT * FROM repo_snapshots WHERE name=?", (name,))
    if row is None:
        raise NotFound(f"there is no repository snapshot {name!r} (`agctl repo list`)", name=name)
    return row


def use_repo(daemon: Daemon, name: str) -> dict[str, Any]:
    """Make name the snapshot new jobs mount; jobs already running keep theirs."""
    _repo_row(daemon, name)
    if not Store.of(daemon).repo_image(name).is_file():
        raise NotFound(f"the image of snapshot {name!r} is missing; fetch it again", name=name)
    with daemon.state.transaction() as db:
        db.execute("UPDATE repo_snapshots SET active=0 WHERE active=1")
        db.execute("UPDATE repo_snapshots SET active=1 WHERE name=?", (name,))
    return _repo_json(_repo_row(daemon, name))


def delete_repo(daemon: Daemon, name: str) -> dict[str, Any]:
    row = _repo_row(daemon, name)
    if row["active"]:
        raise Conflict(
            f"snapshot {name!r} is the one in use; `agctl repo use` another one first", name=name
        )
    _forget_repo(daemon, Store.of(daemon), name)
    return {"deleted": name}


def active_repo_image(daemon: Daemon) -> Path | None:
    """The squashfs image jobs mount at /var/db/repos/gentoo, or None when none is in use."""
    row = daemon.state.one("SELECT name FROM repo_snapshots WHERE active=1")
    if row is None:
        return None
    path = Store.of(daemon).repo_image(row["name"])
    return path if path.is_file() else None


# --- kernel sources ------------------------------------------------------------


async def fetch_kernel(daemon: Daemon, ctx: JobContext, version: str) -> None:
    """Job body: fetch linux-VERSION.tar.xz from a kernel.org-shaped mirror, verified."""
    cfg = daemon.config
    up = cfg.upstream
    store = Store.of(daemon)
    log = ctx.log.line
    filename = f"linux-{version}.tar.xz"
    series = f"v{version.split('.', 1)[0]}.x"
    dest_tree = cfg.kernel_source_dir / f"linux-{version}"
    if daemon.state.one("SELECT 1 FROM kernel_sources WHERE version=?", (version,)) and (
        store.kernel_tarball(filename).is_file()
    ):
        raise AlreadyExists(f"kernel {version} was fetched already", version=version)
    with _scratch(daemon, ctx) as tmp:
        async with Mirrors(up.kernel_mirrors, what="upstream.kernel_mirrors") as mirrors:
            await mirrors.fetch(f"{series}/sha256sums.asc", tmp / "sums.asc", max_bytes=8 << 20)
            signed = await signatures.verify_clearsigned(
                tmp / "sums.asc",
                up.kernel_keyring,
                tmp_dir=cfg.tmp_dir,
                keyring_key="upstream.kernel_keyring",
            )
            sums = signed.text.decode("utf-8", "replace")
            digests.lookup(digests.parse_digests(sums), filename)  # listed, before downloading
            log(f"{series}/sha256sums.asc signed by {signed.fingerprint}")
            tarball = tmp / filename
            got = await mirrors.fetch(
                f"{series}/{filename}", tarball, max_bytes=cfg.limits.max_upload, log=log
            )
        digest = await digests.verify(tarball, sums, filename=filename)
        log(f"digest ok: {digest}")
        if not dest_tree.exists():
            await unpack_kernel(daemon, ctx, tarball, dest_tree)
        _install(tarball, store.kernel_tarball(filename))
        daemon.state.execute(
            "INSERT OR REPLACE INTO kernel_sources"
            " (version, digest, filename, url, signer, size, fetched) VALUES (?,?,?,?,?,?,?)",
            (version, digest, filename, got.url, signed.fingerprint, got.size, st.now()),
        )
    # Ready for pack-kernel under the release's name.
    from autogentoo.daemon import kernels

    with contextlib.suppress(AlreadyExists, InvalidArgument):
        kernels.register(
            daemon,
            f"linux-{version}",
            dest_tree,
            owned=False,
            owner_uid=0,
            source={
                "fetched": version,
                "digest": digest,
                "signer": signed.fingerprint,
                "url": got.url,
            },
        )
    ctx.result.update(
        {
            "version": version,
            "digest": digest,
            "signer": signed.fingerprint,
            "url": got.url,
            "source_tree": str(dest_tree),
        }
    )


async def unpack_kernel(daemon: Daemon, ctx: JobContext, tarball: Path, dest: Path) -> None:
    """Unpack next to dest, then rename into place: a half tree never has the final name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.parent / f".{dest.name}.partial-{ctx.id}"
    if partial.exists():
        await archive.remove_tree(partial)
    partial.mkdir(mode=0o755)
    try:
        ctx.log.line(f"unpacking into {dest}")
        await archive.extract_stage3(
            tarball, partial, max_bytes=daemon.config.limits.max_root_bytes
        )
        entries = list(partial.iterdir())
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].is_symlink():
            raise InvalidArgument(f"{tarball.name} does not hold one top directory")
        os.rename(entries[0], dest)
    finally:
        await archive.remove_tree(partial)


def list_kernels(daemon: Daemon) -> list[dict[str, Any]]:
    return [dict(r) for r in daemon.state.all("SELECT * FROM kernel_sources ORDER BY fetched DESC")]
