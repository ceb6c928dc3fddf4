"""Kernel sources, pack-kernel and boot-test as daemon work.

A kernel source is a named tree: a directory (or tarball, unpacked once) in
the configured kernel source directory, an uploaded tarball, or a release
fetched from a mirror. pack-kernel packs the root (pack-root's single form,
same cache), merges the base config and fragments with the kernel's own
tooling, checks every requested option survived, and builds out of tree in a
directory kept per (source, config), so a changed root only relinks. The
bzImage, its .config and the build log become one artefact, reused when the
same source, config and initramfs come again.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autogentoo.daemon import state as st
from autogentoo.errors import AlreadyExists, InvalidArgument, JobFailed, NotFound
from autogentoo.names import check_file_name

if TYPE_CHECKING:
    from autogentoo.daemon.artifacts import Artifact
    from autogentoo.daemon.jobs import JobContext
    from autogentoo.daemon.qemu import Firmware
    from autogentoo.daemon.roots import Root
    from autogentoo.daemon.service import Daemon


@dataclass(frozen=True)
class Kernel:
    name: str
    path: Path
    owned: bool  # unpacked by us (deleted with it), or someone else's directory
    owner_uid: int
    created: float
    source: dict[str, Any]

    def json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "owner_uid": self.owner_uid,
            "created": self.created,
            "source": self.source,
            "version": _version(self.path),
        }


def _version(tree: Path) -> str | None:
    """VERSION.PATCHLEVEL.SUBLEVEL from the top Makefile."""
    try:
        head = (tree / "Makefile").read_text(errors="replace").splitlines()[:6]
    except OSError:
        return None
    fields = {k.strip(): v for k, _, v in (line.partition("=") for line in head) if _}
    parts = [fields.get(k, "").strip() for k in ("VERSION", "PATCHLEVEL", "SUBLEVEL")]
    return ".".join(p for p in parts if p) or None


def _row(row: Any) -> Kernel:
    return Kernel(
        row["name"],
        Path(row["path"]),
        bool(row["owned"]),
        row["owner_uid"],
        row["created"],
        st.loads(row["source"]),
    )


def get(daemon: Daemon, name: str) -> Kernel:
    row = daemon.state.one("SELECT * FROM kernels WHERE name=?", (name,))
    if row is None:
        raise NotFound(
            f"there is no kernel source {name!r} (see `agctl kernel list`;"
            " `agctl kernel add` registers one)",
            kernel=name,
        )
    return _row(row)


def all_kernels(daemon: Daemon) -> list[Kernel]:
    return [_row(r) for r in daemon.state.all("SELECT * FROM kernels ORDER BY name")]


def _check_tree(path: Path) -> None:
    if not (path / "Makefile").is_file() or not (path / "Kconfig").is_file():
        raise InvalidArgument(f"{path} is not a kernel source tree (no Makefile and Kconfig)")


def register(
    daemon: Daemon, name: str, path: Path, *, owned: bool, owner_uid: int, source: dict[str, Any]
) -> Kernel:
    _check_tree(path)
    try:
        daemon.state.execute(
            "INSERT INTO kernels (name, path, owned, owner_uid, created, source)"
            " VALUES (?,?,?,?,?,?)",
            (name, str(path), int(owned), owner_uid, st.now(), st.dumps(source)),
        )
    except Exception as e:
        if "UNIQUE" in str(e):
            raise AlreadyExists(f"kernel source {name!r} exists already") from None
        raise
    return get(daemon, name)


def source_entry(daemon: Daemon, untrusted: str) -> Path:
    """A directory or tarball named in the configured kernel source directory."""
    check_file_name(untrusted, "name in the kernel source directory")
    path = daemon.config.kernel_source_dir / untrusted
    if not path.exists():
        have = (
            sorted(
                p.name
                for p in daemon.config.kernel_source_dir.iterdir()
                if not p.name.startswith(".")
            )
            if daemon.config.kernel_source_dir.is_dir()
            else []
        )
        raise NotFound(
            f"there is no {untrusted!r} in {daemon.config.kernel_source_dir}"
            f" (there is: {', '.join(have[:20]) or 'nothing'})"
        )
    return path


async def add_from_tarball(
    daemon: Daemon,
    job: JobContext,
    name: str,
    tarball: Path,
    owner_uid: int,
    source: dict[str, Any],
) -> None:
    from autogentoo.daemon.inputs import unpack_kernel

    dest = daemon.config.state_dir / "kernels" / name
    if dest.exists():
        raise AlreadyExists(f"{dest} exists already")
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    await unpack_kernel(daemon, job, tarball, dest)
    try:
        register(daemon, name, dest, owned=True, owner_uid=owner_uid, source=source)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    job.log.line(f"kernel source {name} ({_version(dest)}) registered at {dest}")


def delete(daemon: Daemon, kernel: Kernel) -> None:
    daemon.state.execute("DELETE FROM kernels WHERE name=?", (kernel.name,))
    if kernel.owned:
        shutil.rmtree(kernel.path, ignore_errors=True)


# --- pack-kernel -----------------------------------------------------------------

BASE_FILE_SUFFIX = ".config"
FRAGMENT_SUFFIX = ".kconfig"


def config_file(daemon: Daemon, untrusted: str, suffix: str) -> Path:
    """A file in config_dir/kernel/ by name (with or without its suffix)."""
    name = untrusted if untrusted.endswith(suffix) else untrusted + suffix
    check_file_name(name, "name in config/kernel/")
    path = daemon.config.config_dir / "kernel" / name
    if not path.is_file():
        have = sorted(p.name for p in (daemon.config.config_dir / "kernel").glob(f"*{suffix}"))
        raise NotFound(
            f"there is no {name!r} in {path.parent} (there is: {', '.join(have) or 'nothing'})"
        )
    return path


@dataclass(frozen=True)
class KernelRequest:
    kernel: str
    base: str | Path  # a make target or a full .config
    fragments: tuple[Path, ...]
    jobs: int


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def pack_kernel(
    daemon: Daemon,
    job: JobContext,
    root: Root,
    req: KernelRequest,
    initramfs: Artifact | None,
    *,
    owner_uid: int,
) -> Artifact:
    """Build (or reuse) the kernel; with an initramfs artefact, embedded in it."""
    from autogentoo.daemon import kconfig, kernel

    source = get(daemon, req.kernel)
    log = job.log.write
    key = kernel.config_key(
        f"{source.name}:{source.path}:{_version(source.path)}", req.base, list(req.fragments)
    )
    cache_key = f"pack-kernel:{key}:{initramfs.sha256 if initramfs else 'no-initramfs'}"
    hit = daemon.artifacts.lookup(cache_key)
    if hit is not None:
        job.log.line(f"same kernel source, config and initramfs as artefact {hit.id}: reusing it")
        job.result.update(artifact=hit.id, cached=True)
        return hit
    # With and without an embedded initramfs are different configs: separate
    # directories, so switching between them rebuilds neither.
    build_dir = daemon.config.caches.kernel_builds / (key if initramfs else f"{key}-plain")
    build_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    job.log.line(
        f"kernel {source.name} ({_version(source.path)}) at {source.path},"
        f" build directory {build_dir}"
    )
    async with kernel.build_lock(build_dir):
        (build_dir / USED_MARKER).touch()
        merged = await kconfig.merge(source.path, build_dir, req.base, list(req.fragments), log=log)
        job.log.line(
            f"config merged and verified: {len(merged.requested)} requested option(s) all present"
        )
        result = await kernel.build(
            source.path,
            build_dir,
            True,
            initramfs.path if initramfs else None,
            jobs=req.jobs,
            log=log,
        )
        staging = daemon.artifacts.staging()
        try:
            shutil.copyfile(result.bzimage, staging / "bzImage")
            shutil.copyfile(result.config, staging / "config")
            shutil.copyfile(daemon.jobs.log_path(job.id), staging / "build.log")
            art = daemon.artifacts.add(
                staging,
                ["bzImage", "config", "build.log"],
                kind="kernel",
                owner_uid=owner_uid,
                sha256=_sha(staging / "bzImage"),
                cache_key=cache_key,
                job_id=job.id,
                root=root.name,
                meta={
                    "version": result.version,
                    "efi_stub": result.efi_stub,
                    "kernel_source": source.name,
                    "initramfs": initramfs.id if initramfs else None,
                    "build_seconds": round(result.seconds, 1),
                    "build_dir": str(build_dir),
                    "fragments": [f.name for f in req.fragments],
                    "base": req.base if isinstance(req.base, str) else req.base.name,
                },
            )
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    job.log.line(
        f"artefact {art.id}: bzImage {result.version}"
        f"{' (EFI stub)' if result.efi_stub else ''}, {art.size} bytes"
    )
    job.result.update(artifact=art.id, cached=False)
    return art


# --- pruning -----------------------------------------------------------------------

USED_MARKER = ".autogentoo-last-used"
# A build directory unused this long costs more disk than its relink saves.
KEEP_BUILDS_SECONDS = 30 * 24 * 3600


def prune_builds(base: Path, *, keep_seconds: float = KEEP_BUILDS_SECONDS) -> list[str]:
    """Remove kernel build directories nobody used for keep_seconds (blocking).

    A directory being built in is skipped: its lock is held.
    """
    import fcntl
    import os
    import time

    removed: list[str] = []
    if not base.is_dir():
        return removed
    now = time.time()
    for d in base.iterdir():
        marker = d / USED_MARKER
        if not d.is_dir() or d.is_symlink() or not marker.exists():
            continue
        if now - marker.stat().st_mtime < keep_seconds:
            continue
        fd = os.open(d / ".autogentoo.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
        finally:
            os.close(fd)
    return removed


# --- boot-test ---------------------------------------------------------------------


async def boot_test(
    daemon: Daemon,
    job: JobContext,
    art: Artifact,
    *,
    expect: str,
    timeout: float,
    append: str | None,
    owner_uid: int,
    firmware: Firmware = "bios",
) -> None:
    from autogentoo.daemon import qemu

    if art.kind == "kernel":
        kw: dict[str, Any] = {"kernel": art.path}
        cmdline = append or "console=ttyS0 panic=-1"
    elif art.kind == "image":
        kw = {"kernel": None, "image": art.path}
        cmdline = append or ""
    else:
        raise InvalidArgument(
            f"artefact {art.id} is a {art.kind}; boot-test takes a kernel or an image"
        )
    job.log.line(
        f"booting artefact {art.id} ({art.kind}), expecting {expect!r} within {timeout:.0f}s"
    )
    res = await qemu.boot_test(
        append=cmdline,
        expect=expect,
        timeout=timeout,
        log=job.log.write,
        firmware=firmware,
        **kw,
    )
    if res.console_log and not res.console_log.endswith(b"\n"):
        job.log.write(b"\n")  # QEMU is stopped mid-line once the marker shows
    staging = daemon.artifacts.staging()
    (staging / "console.log").write_bytes(res.console_log)
    console = daemon.artifacts.add(
        staging,
        ["console.log"],
        kind="console-log",
        owner_uid=owner_uid,
        sha256=hashlib.sha256(res.console_log).hexdigest(),
        job_id=job.id,
        root=art.root,
        meta={
            "boots": art.id,
            "passed": res.passed,
            "accel": str(res.accel),
            "seconds": round(res.seconds, 2),
            "expect": expect,
        },
    )
    job.result.update(
        passed=res.passed,
        accel=str(res.accel),
        console=console.id,
        seconds=round(res.seconds, 2),
        reason=res.reason,
    )
    if not res.passed:
        job.log.line(f"--- last console lines ---\n{res.tail}")
        raise JobFailed(
            f"{expect!r} did not appear on the console ({res.reason});"
            f" console log: artefact {console.id}",
            console=console.id,
        )
    job.log.line(f"passed: {expect!r} seen after {res.seconds:.1f}s under {res.accel}")
