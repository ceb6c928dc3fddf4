"""Roots: named stage3 trees, who owns them, and the work done on them.

A root row is written before its tree exists, in state `importing`; only a
finished import makes it `ready`. A daemon that dies mid-import finds the
row at start and removes the half tree, so no half root is ever usable.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autogentoo.daemon import state as st
from autogentoo.daemon.auth import Caller
from autogentoo.daemon.config import Role
from autogentoo.errors import AgError, AlreadyExists, Busy, Code, Forbidden, NotFound

if TYPE_CHECKING:
    from autogentoo.daemon.jobs import JobContext
    from autogentoo.daemon.service import Daemon

log = logging.getLogger(__name__)

IMPORTING = "importing"
READY = "ready"
DELETING = "deleting"


@dataclass(frozen=True)
class Root:
    name: str
    owner_uid: int
    group_gid: int | None
    backend: str
    created: float
    source: dict[str, Any]
    state: str

    def json(self, path: Path | None = None) -> dict[str, Any]:
        out = {
            "name": self.name,
            "owner_uid": self.owner_uid,
            "group_gid": self.group_gid,
            "backend": self.backend,
            "created": self.created,
            "source": self.source,
            "state": self.state,
        }
        if path is not None:
            out["path"] = str(path)
        return out


def _row(row: Any) -> Root:
    return Root(
        row["name"],
        row["owner_uid"],
        row["group_gid"],
        row["backend"],
        row["created"],
        st.loads(row["source"]),
        row["state"],
    )


def get(daemon: Daemon, name: str) -> Root:
    row = daemon.state.one("SELECT * FROM roots WHERE name=?", (name,))
    if row is None:
        raise NotFound(f"there is no root {name!r} (see `agctl roots`)", root=name)
    return _row(row)


def all_roots(daemon: Daemon) -> list[Root]:
    return [_row(r) for r in daemon.state.all("SELECT * FROM roots ORDER BY name")]


def check_access(caller: Caller, root: Root, *, write: bool) -> None:
    """Builders work on roots they own or that are shared with one of their groups."""
    if caller.is_admin or not write:
        return
    if caller.role is Role.BUILDER and (
        root.owner_uid == caller.uid
        or (root.group_gid is not None and root.group_gid in caller.gids)
    ):
        return
    raise Forbidden(
        f"root {root.name!r} belongs to uid {root.owner_uid} and is not shared with your groups",
        root=root.name,
    )


async def unmount_all(daemon: Daemon, name: str) -> list[str]:
    """Remove every mount under a root's tree in the host namespace, deepest first.

    The mount at the root's own path is the storage's when the backend is
    zfs (the dataset); with dir and btrfs any mount there is someone's bind.
    """
    from autogentoo.daemon.config import Backend
    from autogentoo.daemon.mounts import cleanup_under

    storage = daemon.storage_of(name)
    return await cleanup_under(
        str(storage.path(name)), include_root=storage.kind is not Backend.ZFS
    )


def usable(root: Root) -> None:
    if root.state != READY:
        raise Busy(
            f"root {root.name!r} is {root.state}, not ready", root=root.name, state=root.state
        )


def reserve(
    daemon: Daemon,
    name: str,
    owner: Caller,
    group_gid: int | None,
    source: dict[str, Any],
    backend: str | None = None,
) -> None:
    """Claim the name before any tree exists, so two imports cannot race for it."""
    try:
        daemon.state.execute(
            "INSERT INTO roots (name, owner_uid, group_gid, backend, created, source, state)"
            " VALUES (?,?,?,?,?,?,?)",
            (
                name,
                owner.uid,
                group_gid,
                backend or str(daemon.storage.kind),
                st.now(),
                st.dumps(source),
                IMPORTING,
            ),
        )
    except Exception as e:
        if "UNIQUE" in str(e):
            raise AlreadyExists(f"root {name!r} already exists", root=name) from None
        raise


def set_state(daemon: Daemon, name: str, state: str) -> None:
    daemon.state.execute("UPDATE roots SET state=? WHERE name=?", (state, name))


def forget(daemon: Daemon, name: str) -> None:
    daemon.state.execute("DELETE FROM roots WHERE name=?", (name,))


async def recover(daemon: Daemon) -> None:
    """Finish what a dead daemon left half done: half imports, half deletes."""
    for row in daemon.state.all("SELECT * FROM roots WHERE state IN (?, ?)", (IMPORTING, DELETING)):
        root = _row(row)
        log.warning(
            "removing root %s left %s by a previous run",
            root.name,
            root.state,
            extra={"ROOT": root.name},
        )
        try:
            await daemon.storage_for(root.backend).destroy(root.name)
        except AgError as e:
            log.error("cannot remove half root %s: %s", root.name, e.message)
            continue
        forget(daemon, root.name)
    if daemon.config.roots_dir.exists():
        from autogentoo.daemon.mounts import mounts_under

        for m in mounts_under(str(daemon.config.roots_dir)):
            log.warning(
                "mount %s is under the roots directory; `agctl cleanup` removes it", m.mount_point
            )


# --- work on roots (job bodies) -------------------------------------------------


async def import_stage3(
    daemon: Daemon, ctx: JobContext, name: str, tarball: Path, digests: str | None, filename: str
) -> None:
    from autogentoo.daemon import archive, faults
    from autogentoo.daemon import digests as digests_mod

    try:
        await faults.point("import.reserved")
        if digests is not None:
            ctx.log.line(f"checking {filename} against the given digests")
            matched = await digests_mod.verify(tarball, digests, filename=filename)
            ctx.log.line(f"digest ok: {matched}")
            ctx.result["digest"] = matched
        dest = await daemon.storage_of(name).create(name)
        ctx.log.line(f"extracting {filename} into {dest}")
        last = [0]

        def progress(done: int, total: int) -> None:
            pct = done * 100 // total if total else 0
            if pct >= last[0] + 10:
                last[0] = pct
                ctx.log.line(f"  {pct}%")

        stats = await archive.extract_stage3(
            tarball, dest, max_bytes=daemon.config.limits.max_root_bytes, on_progress=progress
        )
        ctx.result["stats"] = _plain(stats)
        await faults.point("import.extracted")
    except BaseException:
        ctx.log.line("import failed; removing the partial root")
        await daemon.storage_of(name).destroy(name)
        forget(daemon, name)
        raise
    set_state(daemon, name, READY)
    ctx.log.line(f"root {name} is ready")


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, Path):
        return str(value)
    return value


_CHOST_RE = re.compile(rb'^\s*CHOST\s*=\s*"?([A-Za-z0-9_.-]+)"?', re.M)

MAKE_CONF_BEGIN = "# BEGIN autogentoo (managed: `agctl bootstrap` rewrites this block)"
MAKE_CONF_END = "# END autogentoo"


def chost_of(root_path: Path) -> str:
    """The root's toolchain tuple, which names its binary package directory."""
    from autogentoo.daemon import pathsafe

    with pathsafe.RootDir(root_path) as rd:
        try:
            text = pathsafe.read_file_in_root(rd.fd, "etc/portage/make.conf", 1 << 20)
        except (AgError, OSError):
            text = b""
    m = _CHOST_RE.search(text)
    return m.group(1).decode() if m else f"{os.uname().machine}-unknown-linux-gnu"


def make_conf_block(daemon: Daemon) -> str:
    cfg = daemon.config
    lines = [
        MAKE_CONF_BEGIN,
        'DISTDIR="/var/cache/distfiles"',
        'PKGDIR="/var/cache/binpkgs"',
        'FEATURES="${FEATURES} buildpkg binpkg-multi-instance"',
        f'MAKEOPTS="{cfg.jobs.makeopts}"',
    ]
    extra = cfg.config_dir / "common-make.conf"
    if extra.is_file():
        lines.append(extra.read_text().rstrip("\n"))
    lines.append(MAKE_CONF_END)
    return "\n".join(lines) + "\n"


def merge_make_conf(current: str, block: str) -> str:
    """Replace our managed block in make.conf, or append it; the rest is the user's."""
    start = current.find(MAKE_CONF_BEGIN)
    end = current.find(MAKE_CONF_END, start) if start != -1 else -1
    if start != -1 and end != -1:
        return current[:start] + block + current[end + len(MAKE_CONF_END) + 1 :]
    sep = "" if not current or current.endswith("\n") else "\n"
    return current + sep + "\n" + block


BOOTSTRAP_DIRS = (
    "var/tmp/portage",
    "var/cache/distfiles",
    "var/cache/binpkgs",
    "var/db/repos",
    "etc/portage",
    "proc",
    "sys",
    "dev",
    "tmp",
    "run",
)


async def bootstrap(daemon: Daemon, ctx: JobContext, root: Root) -> None:
    from autogentoo.daemon import pathsafe

    path = daemon.storage_for(root.backend).path(root.name)
    with pathsafe.RootDir(path) as rd:
        for d in BOOTSTRAP_DIRS:
            os.close(pathsafe.makedirs_in_root(rd.fd, d, 0o755))
            ctx.log.line(f"dir /{d}")
        try:
            current = pathsafe.read_file_in_root(rd.fd, "etc/portage/make.conf", 1 << 20).decode()
        except FileNotFoundError:
            current = ""
        merged = merge_make_conf(current, make_conf_block(daemon))
        if merged != current:
            pathsafe.write_file_in_root(rd.fd, "etc/portage/make.conf", merged.encode(), 0o644)
            ctx.log.line("wrote the autogentoo block in /etc/portage/make.conf")
    ctx.log.line("proving a job runs in the root")
    from autogentoo.daemon import runner

    rc = await runner.run_in_root(
        daemon, ctx, root, ["/bin/sh", "-c", "echo bootstrap ok"], sync_repos=False
    )
    if rc != 0:
        raise AgError(
            f"the test job in root {root.name!r} failed with status {rc}",
            code=Code.JOB_FAILED,
            returncode=rc,
        )
